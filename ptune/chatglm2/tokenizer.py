"""ChatGLM2-6B's tokenizer rebuilt as a plain fast tokenizer, without the model's remote code.

The original ``tokenization_chatglm.py`` (which no longer runs on transformers 5) wraps a SentencePiece BPE model
(``tokenizer.model``): text ids are exactly ``SentencePieceProcessor.encode(text)``, five special tokens follow the
SentencePiece vocabulary (``[MASK] [gMASK] [sMASK] sop eop`` = 64789..64793) and a prompt encoded with special tokens is
``[gMASK] sop`` + its ids. Special tokens are never parsed out of text.

Here the SentencePiece model is translated into a ``tokenizers`` BPE model with the same behaviour:

* normalisation: SentencePiece's spec for this model is the identity (no precompiled charsmap), with a dummy ``▁``
  prefix, spaces escaped to ``▁`` and extra whitespace kept, i.e. ``Prepend("▁")`` + ``Replace(" ", "▁")``; no
  pre-tokenizer, as SentencePiece BPE runs over the whole normalised string;
* model: SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece (leftmost on
  ties). Every split of a normal piece into two normal pieces becomes a merge, ranked by the score of the merged
  piece; characters missing from the vocabulary fall back to ``<0xXX>`` byte pieces. Control/unknown/byte pieces and
  the appended special tokens are never the result of a merge, so text can't produce them;
* special tokens are registered as special added tokens (so decoding can skip them) with ``encode_special_tokens``
  (transformers' ``split_special_tokens=True``) on, so ``sop``, ``</s>``, ``[gMASK]`` ... in text stay plain text;
* a ``TemplateProcessing`` post-processor adds ``[gMASK] sop`` (and ``... $B </s>`` for pairs, as the original);
* decoding equals ``SentencePieceProcessor.decode`` of the non-special ids (see ``_decoder`` for the one corner where
  ill-formed byte sequences can differ), with or without ``skip_special_tokens``: the original turns every special id
  (``<unk>``/pad, ``<s>``, ``</s>`` and the five appended tokens) into an empty piece, so they decode to ``''``.

Checked against SentencePiece on every AdvertiseGen line, awkward strings and ~12M synthetic strings: identical ids.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "CHATGLM2_SPECIAL_TOKENS",
    "build_chatglm2_backend",
    "build_chatglm2_tokenizer",
    "is_chatglm2_tokenizer_dir",
    "save_chatglm2_tokenizer",
]

#: The tokens the original appends after the SentencePiece vocabulary, in id order.
CHATGLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
SPACE = "\u2581"  # "▁", SentencePiece's escaped whitespace

# sentencepiece_model.proto piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.ModelType.BPE


def _load_model_proto(tokenizer_model: str | os.PathLike):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "building the ChatGLM2 tokenizer reads tokenizer.model: install `sentencepiece` and `protobuf`"
        ) from err
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    return proto


def _check_supported(proto, path) -> None:
    """Refuse models whose SentencePiece options this translation does not reproduce exactly."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != _BPE:
        problems.append(f"model_type={trainer.model_type} (only BPE)")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalizer {norm.name!r} with a precompiled charsmap (only the identity)")
    if norm.normalization_rule_tsv:
        problems.append("a normalization_rule_tsv")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if proto.HasField("denormalizer_spec") and (
        proto.denormalizer_spec.precompiled_charsmap or proto.denormalizer_spec.normalization_rule_tsv
    ):
        problems.append("a denormalizer")
    types = {p.type for p in proto.pieces}
    if types & {_USER_DEFINED, _UNUSED}:
        problems.append("user-defined or unused pieces")
    first = [(p.piece, p.type) for p in proto.pieces[:3]]
    if first != [("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL)]:
        problems.append(f"unexpected first pieces {first}")
    if sum(p.type == _BYTE for p in proto.pieces) != 256:
        problems.append("not 256 byte pieces")
    if problems:
        raise ValueError(f"{path}: unsupported SentencePiece model for the ChatGLM2 translation: {'; '.join(problems)}")


def _merges(proto) -> list[tuple[str, str]]:
    """Every way of forming a normal piece from two normal pieces, best (highest-scoring result) first.

    SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece; ranking the merges by
    the score of their result reproduces that order.
    """
    normal = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
    ranked = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _decoder(proto, specials: list[str]) -> decoders.Decoder:
    """SentencePiece's decoding: bytes to text, one U+FFFD per byte of no complete character, ``▁`` to a space.

    ``specials`` decode to ``''`` as in the original (its ``_convert_id_to_token`` maps them to empty pieces), also
    when ``skip_special_tokens`` is off; the pattern matches a whole token, so a piece merely containing ``sop`` stays.

    ``ByteFallback`` turns a whole run of ``<0xXX>`` tokens into U+FFFDs as soon as one byte in it is invalid, where
    SentencePiece replaces only the bytes of no complete character. The ASCII bytes that encoding can emit (those with
    no single-character piece: ``\\n``, ``\\t``, ...) are therefore decoded token by token first, so that e.g. a
    newline next to a cut-off character survives. (Doing so for all 256 bytes would make decoding ~15x slower; a run
    mixing whole and cut multi-byte characters, or carrying bytes that encoding never emits, can still differ.)
    The dummy-prefix ``▁`` is stripped before ``▁`` becomes a space, so that a ``<0x20>`` byte is kept as
    SentencePiece does.
    """
    singles = {p.piece for p in proto.pieces if p.type == _NORMAL and len(p.piece) == 1}
    whole_special = Regex("^(?:" + "|".join(re.escape(t) for t in specials) + ")$")
    steps = [decoders.Replace(whole_special, "")]
    steps += [decoders.Replace(f"<0x{b:02X}>", chr(b)) for b in range(0x80) if chr(b) not in singles]
    steps += [decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=SPACE, left=1, right=0))
    steps.append(decoders.Replace(SPACE, " "))
    return decoders.Sequence(steps)


def build_chatglm2_backend(tokenizer_model: str | os.PathLike) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` equivalent to ChatGLM2's SentencePiece model plus its special tokens."""
    proto = _load_model_proto(tokenizer_model)
    _check_supported(proto, tokenizer_model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    base = len(vocab)
    if base != len(proto.pieces):
        raise ValueError(f"{tokenizer_model}: duplicate pieces")
    for offset, token in enumerate(CHATGLM2_SPECIAL_TOKENS):
        if token in vocab:
            raise ValueError(f"{tokenizer_model}: {token!r} is already a SentencePiece piece")
        vocab[token] = base + offset

    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Tokenizer(BPE(vocab=vocab, merges=_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", SPACE)]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    # Special (so decode(skip_special_tokens=True) drops them) and never matched in text: see encode_special_tokens.
    specials = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)] + list(CHATGLM2_SPECIAL_TOKENS)
    backend.decoder = _decoder(proto, specials)

    gmask, sop, eos = "[gMASK]", "sop", proto.pieces[proto.trainer_spec.eos_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{gmask}:0 {sop}:0 $A:0",
        pair=f"{gmask}:0 {sop}:0 $A:0 $B:1 {eos}:1",
        special_tokens=[(gmask, vocab[gmask]), (sop, vocab[sop]), (eos, vocab[eos])],
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.encode_special_tokens = True
    return backend


def build_chatglm2_tokenizer(tokenizer_model: str | os.PathLike) -> PreTrainedTokenizerBase:
    """ChatGLM2-6B's tokenizer (ids identical to the original) as a transformers fast tokenizer.

    ``bos_token`` stays unset on purpose (the HF trainer would otherwise rewrite the model's bos).
    """
    backend = build_chatglm2_backend(tokenizer_model)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens=list(CHATGLM2_SPECIAL_TOKENS),
        padding_side="left",
        split_special_tokens=True,  # the original never parses special tokens out of text
        clean_up_tokenization_spaces=False,
    )


def save_chatglm2_tokenizer(tokenizer_model: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` + config so that plain ``AutoTokenizer.from_pretrained(out_dir)`` loads it."""
    build_chatglm2_tokenizer(tokenizer_model).save_pretrained(str(out_dir))


def is_chatglm2_tokenizer_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the original ChatGLM(2) tokenizer (remote code), which needs building here."""
    config = Path(folder) / "tokenizer_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    auto = (data.get("auto_map") or {}).get("AutoTokenizer") if isinstance(data.get("auto_map"), dict) else None
    names = [data.get("tokenizer_class")] + (list(auto) if isinstance(auto, (list, tuple)) else [auto])
    return any(isinstance(n, str) and n.rsplit(".", 1)[-1] == "ChatGLMTokenizer" for n in names)
