"""An lm-evaluation-harness model backend, registered as ``irc``.

    import lm_eval
    import irc.eval.lm_eval  # registers "irc" (after lm-eval's own backends)

    lm_eval.simple_evaluate(model="irc", model_args="pretrained=runs/smollm2-f20,flops_saved=0.25",
                            tasks=["lambada_openai"])

``pretrained`` is anything irc evaluates: a base model (Hugging Face directory,
``.gguf``, ``smollm2-135m``; ``irc.load_model``), a routed model directory
(``irc.load``; ``sparsity=`` or ``flops_saved=`` move its dial as ``irc eval`` does),
or an exported prefill ``.onnx`` file (ONNX Runtime, ``OnnxModel``). An already
loaded ``LoadedModel``, ``RoutedModel`` or ``OnnxModel`` is accepted too.

Scoring follows lm-eval's ``hf`` backend exactly (``TemplateLM`` splits
context and continuation; ``_loglikelihood_tokens`` feeds
``(context + continuation)[-(max_length + 1):][:-1]`` and reads the
continuation's log-probabilities; rolling requests use
``get_rolling_token_windows`` + ``make_disjoint_window`` with the prefix token
``bos`` or else ``eos``), so its numbers are comparable with ``hf``'s on the same
weights.

Batching rule: rows are right-padded with ``attention_mask`` 0 on the padding.
Under causal attention a real token never sees the padding after it, and a
per-token route (``threshold``: the token's own margin; sinks are the first
real tokens) never depends on other rows or later tokens, so padding cannot
change a real token's decision or value. ``capacity`` routing (Mixture-of-Depths:
the top ``ceil(c·T)`` tokens of a row) depends on the row's length and on later
tokens, so such models (and ONNX files exported with capacity routing) run one
request per forward pass, unpadded.

``generate_until`` runs irc's KV-cache generation (``irc.generation.generate``;
a base model is routed with every unit dense), stopping as soon as a stop
string appears in the decoded text. An ONNX prefill file has no cache: it
re-runs the prefill for every new token (greedy or sampled alike).

Legend: B batch, T tokens, V vocabulary, C continuation tokens.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401 - lm-eval's own backends enter the registry before ours
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from irc.errors import UserError

# lm-eval's hf backend: the context length when the model's config names none
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


class _StopGeneration(Exception):
    """Raised from ``generate``'s token callback once a stop string has been produced."""


@register_model("irc")
class IrcLM(TemplateLM):
    def __init__(self, pretrained=None, *, dtype: str = "bf16", batch_size: int | str = 1,
                 max_length: int | str | None = None, sparsity: float | str | None = None,
                 flops_saved: float | str | None = None, calib_data: str = "wiki:train",
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, device: str | None = None,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown irc model argument(s): {', '.join(sorted(unknown))}; expected pretrained, "
                            "dtype, batch_size, max_length, sparsity, flops_saved, calib_data, max_gen_toks")
        if pretrained is None:
            raise UserError("the irc backend needs pretrained=MODEL (a routed directory, a Hugging Face "
                            "directory, a .gguf file, an .onnx file or smollm2-135m)")
        if device not in (None, "cpu"):
            raise UserError(f"the irc backend runs on the CPU; got device={device}")
        self.batch_size = _positive_int(1 if batch_size in (None, "auto") else batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.requested = {"sparsity": _fraction(sparsity, "sparsity"),
                          "flops_saved": _fraction(flops_saved, "flops_saved")}
        self.calibration = None
        self.kind, self.model = self._load(pretrained, dtype, calib_data)
        self.tokenizer = self.model.tokenizer() if self.kind == "onnx" else self.model.tokenizer
        self._max_length = _positive_int(max_length, "max_length") if max_length is not None else None
        self.unbatched_reason = self._unbatched_reason()
        if self.unbatched_reason and self.batch_size > 1:
            print(f"warning: batch_size {self.batch_size} ignored, one request per forward pass: "
                  f"{self.unbatched_reason}", file=sys.stderr)
        self._dense_for_generation = None
        self.forward_tokens = 0  # real tokens run through the model, for the FLOPs per token
        self.forward_rows = 0

    # --- loading ---------------------------------------------------------------------------

    def _load(self, pretrained, dtype: str, calib_data: str):
        from irc.exporters.onnx_runtime import OnnxModel
        from irc.models import LoadedModel
        from irc.routing import RoutedModel, is_routed_dir

        if isinstance(pretrained, (LoadedModel, RoutedModel, OnnxModel)):
            model = pretrained
        elif is_routed_dir(pretrained):
            import irc

            model = irc.load(pretrained, dtype=dtype)
        elif str(pretrained).endswith(".onnx"):
            model = OnnxModel(pretrained)
        else:
            import irc

            model = irc.load_model(pretrained, dtype=dtype)
        kind = {LoadedModel: "base", RoutedModel: "routed", OnnxModel: "onnx"}[type(model)]
        dial = self.requested["sparsity"] is not None or self.requested["flops_saved"] is not None
        if dial and kind != "routed":
            raise UserError("sparsity= and flops_saved= apply to routed model directories (made by irc convert); "
                            f"{pretrained} is {'an ONNX file, whose routing is fixed' if kind == 'onnx' else 'a base model'}")
        if kind == "routed":
            from irc.eval.routed import inference_mode, recalibrate

            # irc eval's default calibration windows (1024), shortened for a model with fewer positions
            seq_len = min(1024, model.arch.max_positions or 1024)
            self.calibration = recalibrate(model, **self.requested, calib_data=calib_data, seq_len=seq_len,
                                           name=str(pretrained), show_progress=False)
            inference_mode(model, self.requested["sparsity"])
            model.reset_stats()
        return kind, model

    def _unbatched_reason(self) -> str | None:
        if self.kind == "routed":
            if any(getattr(u, "mode", None) == "capacity" for u in self.model.units.values()):
                return "capacity routing picks the top tokens of a whole row, so padding would change decisions"
        if self.kind == "onnx" and self.model.manifest.get("routing") == "capacity":
            return "this ONNX file routes by capacity (top tokens of a whole row)"
        return None

    # --- what lm-eval asks of a TemplateLM -------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf backend: the context of an empty-context request and of the first rolling window
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        if self.kind == "onnx":
            return DEFAULT_MAX_LENGTH
        arch = self.model.arch
        return arch.max_positions or DEFAULT_MAX_LENGTH

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "irc").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            # a string that already starts with BOS gets no second one (as the hf backend)
            if bos and string.startswith(bos):
                return self.tokenizer.encode(string, add_special_tokens=False)
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- scoring ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[B, T, V]`` (fp32) of right-padded ``ids [B, T]``."""
        if self.kind == "base":
            logits = self.model.model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = self.model(ids, mask)
        self.forward_tokens += int(mask.sum())
        self.forward_rows += ids.shape[0]
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from irc.progress import progress

        # longest first, as the hf backend: equal lengths batch without padding
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        size = 1 if self.unbatched_reason else self.batch_size
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = progress(total=len(requests), desc="loglikelihood", unit="req",
                       enabled=not disable_tqdm and len(requests) > 1)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            rows = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation:
                    raise ValueError("a loglikelihood request needs context and continuation tokens")
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
            T = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T], right-padded
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)] = torch.tensor(r)
                mask[b, : len(r)] = 1
            logp = self._forward(ids, mask)  # [B, T, V]
            for b, i in enumerate(chunk):
                key, _, continuation = requests[i]
                n = len(rows[b])
                lp = logp[b, n - len(continuation) : n]  # [C, V]: position t predicts token t + 1
                target = torch.tensor(continuation)
                answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in disjoint windows of ``max_length`` predicted tokens: the
        first window starts with the prefix token, each later one has the previous window's last
        token as its only context, and the last one takes a full ``max_length`` of context."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores, strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from irc.generation import GenerationConfig
        from irc.progress import progress

        out = []
        bar = progress(total=len(requests), desc="generate", unit="req", enabled=not disable_tqdm)
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id]) or self.tokenizer.eos_token
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            config = GenerationConfig(max_new_tokens=max_new, temperature=temperature, seed=1234)
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1) :]
            text = self.tok_decode(self._generate(prompt, config, [s for s in until if s]))
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(1)
        bar.close()
        return out

    def _generate(self, prompt: list[int], config, stops: list[str]) -> list[int]:
        tokens: list[int] = []

        def on_token(step: int, new: torch.Tensor) -> None:
            tokens.append(int(new[0]))
            if any(s in self.tok_decode(tokens) for s in stops):
                raise _StopGeneration

        if self.kind == "onnx":
            return self._generate_onnx(prompt, config, on_token, tokens)
        from irc.generation import generate

        ids = torch.tensor([prompt], dtype=torch.long)  # [1, T]
        try:
            result = generate(self._generation_model(), ids, config=config, on_token=on_token)
        except _StopGeneration:
            return tokens
        return result.tokens[0]

    def _generation_model(self):
        if self.kind == "routed":
            return self.model
        if self._dense_for_generation is None:  # a base model: routed, every unit dense (as irc generate)
            import irc

            self._dense_for_generation = irc.route(self.model)
            self._dense_for_generation.set_routing("dense")
        return self._dense_for_generation

    def _generate_onnx(self, prompt, config, on_token, tokens) -> list[int]:
        """No KV cache in a prefill file: every step runs the whole sequence again."""
        from irc.generation.generate import _eos_ids
        from irc.generation.sampling import next_token

        eos = set(_eos_ids(self.model)) if config.stop_at_eos else set()
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        ids = torch.tensor([prompt], dtype=torch.long)  # [1, T]
        try:
            for step in range(config.max_new_tokens):
                logits = self.model(ids[:, -self.max_length :])  # [1, T, V]
                token = next_token(logits[:, -1], config, generator)  # [1]
                on_token(step, token)
                if int(token[0]) in eos:
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
        except _StopGeneration:
            pass
        return tokens

    # --- facts for the results -------------------------------------------------------------

    def reset_facts(self) -> None:
        """Start counting tokens, sparsity and FLOPs afresh: one loaded model evaluated task by
        task (``bench/tasks.py``) reports each task's own figures."""
        self.forward_tokens = 0
        self.forward_rows = 0
        if self.kind == "routed":
            self.model.reset_stats()

    def facts(self) -> dict:
        """What was evaluated: for a routed model, the sparsity and FLOPs saved it achieved on the
        tokens scored (prefill forward passes; generated tokens are not counted)."""
        if self.kind == "base":
            return {"kind": "base", "routed": False, "model": self.model.describe()}
        if self.kind == "onnx":
            m = self.model.manifest
            return {"kind": "onnx", "routed": m.get("routing") not in (None, "dense"), "path": str(self.model.path),
                    "routing": m.get("routing"), "capacity": m.get("capacity")}
        from irc.eval.routed import routed_flops
        from irc.eval.sparsity import achieved_sparsity

        routed = self.model
        seq_len = max(1, round(self.forward_tokens / self.forward_rows)) if self.forward_rows else self.max_length
        sparsity = achieved_sparsity(routed) if self.forward_tokens else None
        flops = routed_flops(routed, seq_len) if self.forward_tokens else None
        training = routed.records.get("training", {})
        return {
            "kind": "routed", "routed": True, "variant": routed.plan.variant,
            "trained_sparsity": training.get("sparsity"), "trained_flops_saved": training.get("flops_saved"),
            "requested_sparsity": self.requested["sparsity"], "requested_flops_saved": self.requested["flops_saved"],
            "achieved_sparsity": sparsity["overall"] if sparsity else None,
            "sparsity_by_kind": sparsity["by_kind"] if sparsity else None,
            "flops_saved": flops["saved"] if flops else None,
            "flops_per_token": {"dense": flops["dense"], "routed": flops["routed"]} if flops else None,
            "flops_seq_len": seq_len,  # the mean forward length the attention FLOPs are counted at
            "tokens_routed": self.forward_tokens,
            "calibration": self.calibration,
        }


def _positive_int(value, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return n


def _fraction(value, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0:
        raise UserError(f"{name} must be in [0, 1), got {value!r}")
    return f
