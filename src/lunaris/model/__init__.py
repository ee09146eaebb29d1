from lunaris.model.model import LunarisCodex, ModelOutput, model_from_checkpoint

__all__ = ["LunarisCodex", "ModelOutput", "model_from_checkpoint"]
