from lunaris.model.model import LunarisCodex, ModelOutput, build_on_meta, model_from_checkpoint

__all__ = ["LunarisCodex", "ModelOutput", "build_on_meta", "model_from_checkpoint"]
