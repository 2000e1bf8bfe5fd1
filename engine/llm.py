"""The small chat LLM shared by the router and the prompt rewriter: load, score choices, generate.

Every method ending in ``_blocking`` runs on the one thread that owns the model (the GPU thread
in the engine). The user's text only ever enters inside the user turn of the chat template, and
``sanitise_user_text`` strips chat-template control tokens from it first, so a prompt cannot
close its own turn and speak as the system or the assistant.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.workers import MODEL_LOADING

log = logging.getLogger(__name__)

# `<|im_start|>`, `<|im_end|>`, `<|endoftext|>` (ChatML / Qwen), `<|begin_of_text|>`, `<|eot_id|>`,
# `<|start_header_id|>` (Llama 3) and any other `<|...|>` marker, plus the older `[INST]`/`<<SYS>>`
# and `<s>`/`</s>` forms. Whitespace inside the bars is tolerated on purpose (`<| im_end |>`).
_CONTROL_TOKENS = re.compile(r"<\|[^<>|]{0,64}\|>|\[/?INST\]|<</?SYS>>|</?s>", re.IGNORECASE)
# C0/C1 control characters other than tab and newline: invisible, and never part of a real prompt.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitise_user_text(text: str, extra_tokens: Sequence[str] = ()) -> str:
    """``text`` without chat-template control tokens or control characters.

    Removal repeats until nothing changes, so pieces that join into a marker once a marker
    between them is removed (``<|im_<|x|>end|>``) are caught too. ``extra_tokens`` are
    further literal strings to remove (a tokenizer's own special tokens).
    """
    previous = None
    while previous != text:
        previous = text
        text = _CONTROL_TOKENS.sub("", text)
        for token in extra_tokens:
            if token:
                text = text.replace(token, "")
        text = _CONTROL_CHARS.sub("", text)
    return text.strip()


def _is_local(source: str) -> bool:
    """A folder (existing, or written as a path) rather than a hub id like "Qwen/Qwen2.5-1.5B-Instruct"."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir()


def _shown_name(source: str) -> str:
    """A name for messages: a hub id as is, a local folder by its last part (never the path)."""
    return Path(source).name if _is_local(source) else source


class ChatLLM:
    """A causal LM with a chat template; ``load_blocking`` builds it, the GPU thread drives it."""

    def __init__(self, source: str, model: Any, tokenizer: Any) -> None:
        self.source = source
        self._model = model
        self._tokenizer = tokenizer
        # Every special token the tokenizer knows is stripped from user text as well as the
        # generic `<|...|>` pattern: a model family with other markers is covered too.
        self._special_tokens = tuple(t for t in getattr(tokenizer, "all_special_tokens", ()) if len(t) > 1)

    # -- lifetime --------------------------------------------------------------------------

    @classmethod
    def load_blocking(cls, source: str, device: Any, dtype: Any) -> ChatLLM:
        """AutoModelForCausalLM + AutoTokenizer from a hub id or a local folder (offline)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": True} if _is_local(source) else {}
        started = time.perf_counter()
        try:
            with MODEL_LOADING:
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
            model.to(device).eval()
        except OSError as exc:  # missing files: not downloaded, offline, or a wrong folder
            raise ModelLoadError(_shown_name(source), "its files were not found (not downloaded yet, or offline?)") from exc
        except Exception as exc:  # ValueError, torch errors: a broken or unsupported folder
            raise ModelLoadError(_shown_name(source), f"loading failed ({type(exc).__name__})") from exc
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelLoadError(_shown_name(source), "the tokenizer has no chat template")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        log.info("chat LLM %s loaded on %s in %.2f s", _shown_name(source), device, time.perf_counter() - started)
        return cls(source, model, tokenizer)

    def release_blocking(self) -> None:
        """Drop the weights (and give CUDA memory back when they lived there)."""
        device = getattr(self._model, "device", None)
        self._model = None
        if device is not None and getattr(device, "type", "") == "cuda":
            import torch

            torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    # -- prompts ---------------------------------------------------------------------------

    def chat_text(self, system: str, user: str) -> str:
        """The full chat up to the assistant's answer; ``user`` is sanitised and stays in its turn."""
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": sanitise_user_text(user, self._special_tokens)},
        ]
        return str(self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def _end_of_turn(self) -> str:
        """The text that closes the assistant's turn (``<|im_end|>`` for ChatML)."""
        eos = self._tokenizer.eos_token
        return eos if isinstance(eos, str) else ""

    # -- work ------------------------------------------------------------------------------

    def score_choices_blocking(self, system: str, user: str, choices: Sequence[str], *,
                               reduction: str = "sum") -> list[float]:
        """The log-probability of each choice as the whole assistant answer, in one forward pass.

        Each row is ``prompt + choice + end-of-turn``; scoring the end-of-turn token too means a
        choice that is a prefix of another ("flux" vs "flux_dev") is not favoured. Rows are
        right-padded, so every real token keeps the position it would have alone (causal
        attention never looks right), and the padded positions are masked out of the sums.
        ``reduction``: "sum" (the sequence log-probability) or "mean" (per answer token).
        """
        import torch

        if not choices:
            return []
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
        self._require_loaded()
        tok = self._tokenizer
        prefix = tok(self.chat_text(system, user), add_special_tokens=False)["input_ids"]
        answers = [tok(c + self._end_of_turn(), add_special_tokens=False)["input_ids"] for c in choices]
        rows = [prefix + a for a in answers]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        device = self._model.device
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.inference_mode():
            logits = self._model(input_ids=ids, attention_mask=mask).logits.float()
        # The token at position t is predicted by the logits at t - 1.
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores = []
        for i, answer in enumerate(answers):
            start = len(prefix) - 1
            picked = log_probs[i, start:start + len(answer)]
            total = float(picked.sum())
            scores.append(total / max(len(answer), 1) if reduction == "mean" else total)
        return scores

    def generate_blocking(self, system: str, user: str, *, max_new_tokens: int = 64,
                          timeout_s: float | None = None) -> str:
        """Greedy (deterministic) answer; stops at end of turn, ``max_new_tokens`` or ``timeout_s``."""
        import torch

        self._require_loaded()
        tok = self._tokenizer
        encoded = tok(self.chat_text(system, user), add_special_tokens=False, return_tensors="pt").to(self._model.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tok.pad_token_id,
        }
        if timeout_s is not None:
            kwargs["max_time"] = timeout_s  # transformers' MaxTimeCriteria: checked after each token
        with torch.inference_mode():
            out = self._model.generate(**encoded, **kwargs)
        new_tokens = out[0, encoded["input_ids"].shape[1]:]
        return str(tok.decode(new_tokens, skip_special_tokens=True)).strip()

    def _require_loaded(self) -> None:
        if self._model is None:
            raise RuntimeError(f"chat LLM {_shown_name(self.source)} was released")


class LLMCache:
    """One loaded copy per source, shared by the router and the rewriter; GPU thread only.

    The lock is there so a second thread that breaks the rule gets a correct answer, not a
    second copy of the weights.
    """

    def __init__(self, device: Any, dtype: Any,
                 loader: Callable[[str, Any, Any], ChatLLM] = ChatLLM.load_blocking) -> None:
        self.device, self.dtype = device, dtype
        self._loader = loader
        self._llms: dict[str, ChatLLM] = {}
        self._lock = threading.Lock()

    def get_blocking(self, source: str) -> ChatLLM:
        with self._lock:
            llm = self._llms.get(source)
            if llm is None:
                llm = self._llms[source] = self._loader(source, self.device, self.dtype)
            return llm

    def loaded_sources(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._llms)

    def release_all_blocking(self) -> None:
        with self._lock:
            llms, self._llms = list(self._llms.values()), {}
        for llm in llms:
            llm.release_blocking()
