"""The stage drivers, one per stage (`python -m crema.stages.<stage>`), and the `crema` CLI beside them.

The only package that imports Ray: everything below it (crema.data, crema.model, crema.train,
crema.evaluation) runs without a cluster.
"""
