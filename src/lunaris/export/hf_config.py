"""configuration_lunaris.py of an exported Lunaris model (Hugging Face `trust_remote_code`).

Copied verbatim into the export directory by `lunaris export`; needs only `transformers`.
"""

from transformers import PretrainedConfig


class LunarisConfig(PretrainedConfig):
    """The Lunaris model config, kept whole under `lunaris` (the LunarisCodexConfig fields as a dict).

    The values generic Hugging Face tools look for (hidden_size, num_hidden_layers, ...) are derived from
    it under their usual names; `lunaris` stays the single source of truth.
    """

    model_type = "lunaris"

    def __init__(self, lunaris: dict = None, **kwargs):
        self.lunaris = dict(lunaris or {})
        get = self.lunaris.get
        d_model, n_heads = get("d_model"), get("n_heads")
        derived = {
            "vocab_size": get("vocab_size"),
            "hidden_size": d_model,
            "num_hidden_layers": get("n_layers"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": get("n_kv_heads") or n_heads,
            "head_dim": d_model // n_heads if d_model and n_heads else None,
            "max_position_embeddings": get("max_seq_len"),
        }
        for name in derived:
            kwargs.pop(name, None)
        kwargs["tie_word_embeddings"] = get("tie_embeddings", True)
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        for name, value in derived.items():
            setattr(self, name, value)
