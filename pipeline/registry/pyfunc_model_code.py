"""Models-from-code entry point: MLflow runs this file when it loads a registered caption
model, so the model object is built by the packaged ``pipeline`` code and nothing is
unpickled (no cloudpickle, no code executed from a pickle). Logged by the register stage."""

from mlflow.models import set_model

from pipeline.registry.pyfunc_model import CaptionModel

set_model(CaptionModel())
