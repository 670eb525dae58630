"""The fine-tuned CREMA classifier as an MLflow pyfunc (logged by crema.tracking.log_classifier as the model's
code; the weights are the safetensors artifact of crema.train.artifacts.save_classifier).
predict({"x": (n, 12, L) float32 mV, "lead_mask": (n, 12) bool}, params={"fs": 500}) returns a DataFrame of
the class probabilities, one column per task class (crema.evaluation.serving.classify)."""

import mlflow


class CremaClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from crema.train.artifacts import load_classifier

        self.model, self.classes = load_classifier(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None):
        from crema.evaluation.serving import classify

        return classify(self.model, self.classes, model_input, params)


mlflow.models.set_model(CremaClassifier())
