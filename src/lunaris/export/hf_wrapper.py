"""Hugging Face classes around LunarisCodex: the last section of an exported modeling_lunaris.py.

Not imported by lunaris: `lunaris export` appends this text to the embedded model code, where the
lunaris imports below are removed because LunarisCodex and model_config_from_dict are defined in the
same file.
"""

import warnings

import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lunaris.config import model_config_from_dict
from lunaris.model.layers import RotaryEmbedding
from lunaris.model.model import LunarisCodex

from .configuration_lunaris import LunarisConfig

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`: `generate`
# passes it under the new name, and a forward that reads only the old one would start an empty cache at every
# step (each token decoded alone, at position 0). The output is built with the name this version's class has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HFLayerCache:
    """One layer's view of a Hugging Face `Cache`, with the interface LunarisCodex's attention calls.

    Lunaris attention calls `cache.update(k, v, start)` and gets back all keys and values so far,
    (B, n_kv_heads, start + T, head_dim); a Hugging Face cache keeps every layer by index.
    """

    def __init__(self, cache, layer_idx: int):
        self.cache, self.layer_idx = cache, layer_idx

    def update(self, k, v, start: int):
        return self.cache.update(k, v, self.layer_idx)


class LunarisForCausalLM(PreTrainedModel, GenerationMixin):
    """LunarisCodex (dense, IRL or MoC) as a Hugging Face causal LM; the weights live under `model.`.

    Batches must be unpadded (prompts of equal length): Lunaris attention has no padding mask.
    MoC layers run dropless in eval mode, as in Lunaris's own evaluation and generation.
    A model trained with attention_mask: document computes, like LunarisCodex, each document of a packed row
    alone in a forward without a KV cache (config.use_cache is false for it), and treats its input as one document
    in a forward with a cache (generation), as Lunaris's own generation does.
    """

    config_class = LunarisConfig
    base_model_prefix = "lunaris"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True
    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}

    def __init__(self, config: LunarisConfig):
        super().__init__(config)
        self.model = LunarisCodex(model_config_from_dict(config.lunaris, source="config.json 'lunaris'"))
        self.post_init()

    def _init_weights(self, module):
        """LunarisCodex initializes its own weights; only the rotary tables (buffers, never saved) need rebuilding
        when the model was created on the meta device."""
        if isinstance(module, RotaryEmbedding):
            module.cos, module.sin = module._tables(module.cos.device)

    def get_input_embeddings(self):
        return self.model.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                logits_to_keep=0, return_dict=None, cache=None, **kwargs):
        """input_ids (B, T); labels (B, T) as in every Hugging Face causal LM (shifted inside, -100 ignored).

        The KV cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (earlier versions).
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both.")
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError("LunarisForCausalLM needs input_ids (inputs_embeds is not supported).")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LunarisForCausalLM does not support padded batches: pass prompts of equal length "
                             "(or one prompt at a time) without padding.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        caches = None
        if past_key_values is not None:
            caches = [HFLayerCache(past_key_values, i) for i in range(len(self.model.blocks))]
            lunaris = self.model.config
            if (lunaris.attention_mask == "document" and start == 0
                    and bool((input_ids[:, :-1] == lunaris.document_separator_id).any())):
                warnings.warn("this model was trained with attention_mask: document; a forward with a KV cache "
                              "(generation) treats its input as one document, as Lunaris's generation does. Call it "
                              "with use_cache=False for the logits of each document of the input alone.",
                              stacklevel=2)
        targets = None
        if labels is not None:  # Lunaris targets are next tokens with -1 ignored; the loss adds MoC's aux losses
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)                          # (B, T)
            targets = shifted.masked_fill(shifted == -100, -1)
        out = self.model(input_ids, targets=targets, caches=caches, start=start,
                         last_logits_only=(logits_to_keep == 1 and targets is None))
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits,
                                      **{CACHE_FIELD: past_key_values if use_cache else None})
