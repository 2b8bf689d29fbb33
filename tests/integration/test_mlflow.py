import uuid

import mlflow
from mlflow import MlflowClient


class Scale(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> list[float]:
        return [x * 2 for x in model_input]


def test_register_alias_and_load_from_the_registry(stack, tmp_path):
    mlflow.set_tracking_uri(stack.mlflow_tracking_uri)
    name = f"test-model-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment("recstream-tests")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Scale(), registered_model_name=name,
                                       pip_requirements=["numpy"])
    client = MlflowClient()
    version = client.search_model_versions(f"name='{name}'")[0].version
    client.set_registered_model_alias(name, "champion", version)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert list(model.predict([1.0, 2.0])) == [2.0, 4.0]
    assert info.registered_model_version == version
