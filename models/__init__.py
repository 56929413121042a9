"""medai's model families; every model is built through `create_model`."""

from medai.models.registry import create_model, list_models, load_weights, model_entry, register_model, save_weights

__all__ = ["create_model", "list_models", "load_weights", "model_entry", "register_model", "save_weights"]
