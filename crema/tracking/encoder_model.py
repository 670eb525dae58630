"""The CREMA encoder as an MLflow pyfunc (logged by crema.tracking.log_encoder_model as the model's code; the
weights are the safetensors artifact). predict({"x": (n, 12, L) float32 mV, "lead_mask": (n, 12) bool},
params={"fs": 500}) returns the (n, D) float32 embeddings (crema.evaluation.serving.embed)."""

import mlflow


class CremaEncoder(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from crema.train.artifacts import load_encoder

        self.encoder = load_encoder(context.artifacts["encoder"])

    def predict(self, context, model_input, params=None):
        from crema.evaluation.serving import embed

        return embed(self.encoder, model_input, params)


mlflow.models.set_model(CremaEncoder())
