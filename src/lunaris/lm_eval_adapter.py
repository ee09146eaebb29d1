"""The `lunaris` model of EleutherAI's lm-evaluation-harness: any Lunaris checkpoint, no export needed.

    python -m lunaris.lm_eval_adapter --model lunaris --model_args checkpoint=runs/demo/dense \\
        --tasks my_task --include_path my_tasks/ --batch_size 16

takes exactly `lm_eval`'s arguments. lm_eval's own command looks models up in its built-in registry only (0.4.x
has no plugin hook), so this module, which registers `lunaris` there, must be imported first: running it with
`python -m` does that and then runs lm_eval's command line. From Python, import it and pass `model="lunaris"` to
`lm_eval.simple_evaluate`, or pass a `LunarisLM(...)` instance.

model_args: checkpoint (a checkpoint file or run directory, required), tokenizer (a tokenizer.json; default the
run directory's), device (auto), dtype (auto: bf16 on GPUs that support it, else fp32), batch_size (8),
max_gen_toks (256), threads.

Log-likelihoods come from `lunaris.tasks.scoring.score`, the function `lunaris eval --tasks` and the trainer use,
so a task scored here and by `lunaris eval` gives the same numbers. Needs `pip install 'lunaris[eval]'`.
"""

import sys
import warnings

import torch

from lunaris.data.tokenizer import end_of_text_id, find_tokenizer, load_tokenizer
from lunaris.errors import LunarisError
from lunaris.generate import load_model
from lunaris.tasks.scoring import score

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry imports them only while empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise LunarisError(f"the lm-evaluation-harness adapter needs the lm_eval package ({exc}); install it with "
                       f"`pip install 'lunaris[eval]'`.") from None

DEFAULT_BATCH_SIZE = 8


def _batch_size(value) -> int:
    """lm_eval passes --batch_size as text: an integer, or auto / auto:N (taken as the default here)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise LunarisError(f"batch_size must be a positive integer, got {value!r}.")
    return size


@register_model("lunaris")
class LunarisLM(TemplateLM):
    """A Lunaris checkpoint as an lm-eval model: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(self, checkpoint=None, tokenizer=None, device=None, dtype: str = "auto", batch_size=None,
                 max_batch_size=None, max_gen_toks: int = 256, threads=None, **unused):
        super().__init__()
        if not checkpoint:
            raise LunarisError("the lunaris model needs model_args checkpoint=PATH (a checkpoint file or run "
                               "directory).")
        if unused:
            warnings.warn(f"lunaris model: ignoring unknown model_args {sorted(unused)}", stacklevel=2)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda:0 unless told otherwise; its hf model falls back the same way
            warnings.warn(f"lunaris model: device {device} is not available here; using auto", stacklevel=2)
            device = None
        self.model = load_model(checkpoint, device or "auto", dtype, int(threads) if threads else None)
        self.tokenizer = load_tokenizer(find_tokenizer(checkpoint, tokenizer), self.model.config.vocab_size)
        self._eot = end_of_text_id(self.tokenizer)
        if self._eot is None:
            raise LunarisError("the tokenizer has no <|endoftext|> token, which lm-eval needs (empty contexts, "
                               "end of generation).")
        self._device = self.model.wte.weight.device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.checkpoint = str(checkpoint)

    # ---- what lm-eval asks of a model ----
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"lunaris:{self.checkpoint}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        return {"model": "lunaris", "checkpoint": self.checkpoint, "parameters": self.model.num_params()}

    # ---- scoring ----
    def _scores(self, pairs: list) -> list:
        logliks, greedy = score(self.model, pairs, self.batch_size).cpu().tolist()
        return [(float(ll), g > 0.5) for ll, g in zip(logliks, greedy)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """requests: [((context, continuation), context ids, continuation ids)] -> [(log-likelihood, is_greedy)]"""
        results = self._scores([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """The log-likelihood of whole texts, in disjoint windows of max_seq_len (as lm-eval's HF model does)."""
        pairs, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (loglik, _) in zip(owners, self._scores(pairs)):
            totals[owner] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy (or sampled, with do_sample) continuations, cut at the first stop sequence."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self._eot]
            idx = torch.tensor([ids], dtype=torch.long, device=self._device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "stopped at the context limit": expected here
                out = self.model.generate(idx, max_new_tokens=max_new, temperature=temperature,
                                          top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p else None,
                                          eos_token_id=self._eot)
            new = out[0, len(ids):].tolist()
            if self._eot in new:
                new = new[:new.index(self._eot)]
            text = self.tok_decode(new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


def main(argv=None) -> None:
    """lm_eval's command line, with the `lunaris` model registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
