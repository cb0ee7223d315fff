"""The fast tokenizer behind every feature: a `tokenizers.Tokenizer` with its padding, no transformers needed.

`TextTokenizer.load` reads a model or bundle folder's tokenizer.json (and the pad token its tokenizer_config.json or
special_tokens_map.json names), so serving a bundle needs neither transformers nor PyTorch. `TextTokenizer.of` wraps
the fast tokenizer transformers loads with a model, sharing its backend. Both give the ids, offsets and windows
transformers' own call gives (tests/test_data.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class TextTokenizer:
    backend: Tokenizer
    pad_id: int
    pad_token: str
    pad_type_id: int = 0
    token_types: bool = True  # whether features carry token_type_ids (BERT's do, RoBERTa's not)

    @classmethod
    def load(cls, folder: str | Path) -> TextTokenizer:
        """The tokenizer of an HF model or bundle folder, from its tokenizer.json and tokenizer config files."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ToolchainError(f"{folder} has no fast tokenizer (tokenizer.json)")
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            try:
                config |= json.loads((folder / name).read_text()) if (folder / name).is_file() else {}
            except (OSError, json.JSONDecodeError) as e:
                raise ToolchainError(f"unreadable {folder / name}: {e}") from None
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ToolchainError(f"cannot load the tokenizer of {folder}: {type(e).__name__}: {e}") from None
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is None or backend.token_to_id(pad) is None:
            raise ToolchainError(f"the tokenizer of {folder} has no padding token")
        side = config.get("padding_side", "right")
        if side != "right":
            raise ToolchainError(f"features need a tokenizer that pads on the right, not {side!r} ({folder})")
        return cls(backend, backend.token_to_id(pad), pad,
                   token_types="token_type_ids" in config.get("model_input_names", ["token_type_ids"]))

    @classmethod
    def of(cls, tokenizer) -> TextTokenizer:
        """``tokenizer`` itself, or the fast tokenizer of a transformers tokenizer."""
        if isinstance(tokenizer, cls):
            return tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ToolchainError("a fast tokenizer (tokenizer.json) is needed for offset mappings")
        if tokenizer.padding_side != "right":
            raise ToolchainError(f"features need a tokenizer that pads on the right, not {tokenizer.padding_side!r}")
        if tokenizer.pad_token_id is None:
            raise ToolchainError("the tokenizer has no padding token")
        return cls(tokenizer.backend_tokenizer, tokenizer.pad_token_id, tokenizer.pad_token, tokenizer.pad_token_type_id,
                   "token_type_ids" in tokenizer.model_input_names)

    @property
    def vocab_size(self) -> int:
        """Tokens the ids can take, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_tokens(self, pair: bool) -> int:
        """How many special tokens a single text or a pair gets."""
        processor = self.backend.post_processor
        return processor.num_special_tokens_to_add(pair) if processor is not None else 0

    def encode(self, texts: list[str | tuple[str, str]], max_length: int | None = None, strategy: str = "longest_first",
               stride: int = 0, pad: bool = False, special_tokens: bool = True) -> list[Encoding]:
        """One encoding per text or (text, text pair), truncated to ``max_length`` (the windows past the first in each
        one's ``overflowing``, ``stride`` tokens shared) and, with ``pad``, padded to it on the right."""
        backend = self.backend
        truncation, padding = backend.truncation, backend.padding  # the backend may be shared: put them back after
        try:
            if max_length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(max_length, stride=stride, strategy=strategy)
            if pad:
                backend.enable_padding(pad_id=self.pad_id, pad_type_id=self.pad_type_id, pad_token=self.pad_token,
                                       length=max_length)
            else:
                backend.no_padding()
            return backend.encode_batch(texts, add_special_tokens=special_tokens)
        finally:
            backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
            backend.no_padding() if padding is None else backend.enable_padding(**padding)
