"""The model: the network (:mod:`.network`), its masking (:mod:`.masking`) and its loss terms (:mod:`.losses`).

Nothing here imports Ray, MLflow or the data readers: a model is built from a ModelConfig and takes tensors.
"""
