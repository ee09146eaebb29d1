from lunaris.model.model import LunarisCodex, ModelOutput

__all__ = ["LunarisCodex", "ModelOutput"]
