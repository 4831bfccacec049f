"""Tokenization and chat templates from a model folder, without transformers.

A deployment reads the same files transformers' ``AutoTokenizer`` reads (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``) and must turn
text into the ids the model was exported with, byte for byte. The ``tokenizers`` library runs
``tokenizer.json`` as it is; what transformers adds on top is reproduced here, because an id that
differs silently changes answers:

- per tokenizer class: the padding side (LLaMA-family tokenizers pad on the left), whether
  ``token_type_ids`` are model inputs, and for LLaMA/Gemma/Cohere/GPT-NeoX tokenizers a
  post-processor rebuilt from ``add_bos_token``/``add_eos_token`` (a hub ``tokenizer.json`` may
  disagree with the config, and transformers believes the config);
- ``add_prefix_space`` from the config overriding the byte-level pre-tokenizer's;
- truncation ``longest_first`` on the configured side, padding to the longest row with the pad id;
- ``clean_up_tokenization_spaces`` on decode (SmolLM2's config turns it on);
- chat templates rendered as ``apply_chat_template`` renders them (transformers 4.57:
  an immutable sandbox with ``trim_blocks``/``lstrip_blocks``, loop controls, its own ``tojson``,
  ``raise_exception`` and ``strftime_now``, the special tokens as variables), then encoded without
  special tokens.

`TextStream` turns generated ids into text pieces whose concatenation is the decoded answer, so a
server can stream them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, pre_tokenizers, processors

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.files import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PLAIN_SEPARATOR = "\n\n"  # between the turns of a prompt for a model without a chat template
# the attributes transformers hands a chat template as variables (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ADDITIONAL_SPECIAL_TOKENS = "additional_special_tokens"

# Behaviour of transformers' fast tokenizer classes (4.57) that tokenizer.json does not carry, keyed by
# the class name without "Fast". Classes not listed behave as PreTrainedTokenizerFast.
LEFT_PADDING = frozenset({"LlamaTokenizer", "CodeLlamaTokenizer", "CohereTokenizer", "GemmaTokenizer", "XLNetTokenizer"})
# (add_bos_token, add_eos_token) defaults of the classes that rebuild their post-processor from the config
BOS_EOS_TEMPLATE = {
    "LlamaTokenizer": (True, False),
    "CodeLlamaTokenizer": (True, False),
    "CohereTokenizer": (True, False),
    "GemmaTokenizer": (True, False),
    "GPTNeoXTokenizer": (False, False),
}
# classes whose model inputs are input_ids and attention_mask only (every other class also returns token_type_ids)
NO_TOKEN_TYPES = frozenset(
    {
        "Bart", "Barthez", "BigBird", "Blenderbot", "Bloom", "Camembert", "CLIP", "CodeLlama", "CodeGen", "Cohere", "DistilBert",
        "DPRContextEncoder", "DPRQuestionEncoder", "DPRReader", "Gemma", "GPT2", "GPTNeoX", "LayoutLMv3", "LayoutXLM", "LED", "Llama",
        "Longformer", "MBart", "MBart50", "MPNet", "Mvp", "Nllb", "Nougat", "OpenAIGPT", "Pegasus", "Qwen2", "Reformer", "Roberta",
        "SeamlessM4T", "T5", "Udop", "Whisper", "XGLM", "XLMRoberta",
    }
)  # fmt: skip
# the prefix-space default is None (leave the pre-tokenizer alone) for these, False for every other class
PREFIX_SPACE_NONE = frozenset({"LlamaTokenizer", "CodeLlamaTokenizer"})

Row = str | tuple[str, str] | list[str]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# transformers' clean_up_tokenization, in its order
CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
    (" 're", "'re"),
)  # fmt: skip
CLEAN_UP_CHARACTERS = frozenset("".join(before for before, _ in CLEAN_UPS))


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the spaces a word-piece decode leaves before punctuation and contractions."""
    for before, after in CLEAN_UPS:
        text = text.replace(before, after)
    return text


def _chat_template(folder: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja wins over tokenizer_config.json (as in transformers)."""
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MetaTTError(f"{path} is not UTF-8 text; re-save the tokenizer (save_pretrained) to rewrite it") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # the legacy form of several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise MetaTTError(
                f"{folder / TOKENIZER_CONFIG_FILE} has chat templates {', '.join(map(str, named))} but none named 'default'; "
                "name one 'default' or pass --raw"
            )
    if template is not None and not isinstance(template, str):
        raise MetaTTError(f"{folder / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of named templates; fix the file")
    return template


@dataclass(frozen=True)
class TokenizerSettings:
    """What transformers reads around tokenizer.json, resolved once per folder."""

    tokenizer_class: str
    padding_side: str
    truncation_side: str
    token_type_ids: bool
    clean_up_tokenization_spaces: bool
    special_tokens: dict[str, str]
    additional_special_tokens: tuple[str, ...]

    @classmethod
    def read(cls, folder: Path, config: dict) -> TokenizerSettings:
        name = str(config.get("tokenizer_class") or "PreTrainedTokenizerFast").removesuffix("Fast")
        special_map_path = folder / SPECIAL_TOKENS_MAP_FILE
        special_map = read_json(special_map_path, "special tokens map") if special_map_path.is_file() else {}
        if not isinstance(special_map, dict):
            raise MetaTTError(f"{special_map_path} must hold a JSON object; re-save the tokenizer (save_pretrained)")
        special: dict[str, str] = {}
        for key in SPECIAL_TOKEN_NAMES:
            value = _token_text(config.get(key)) or _token_text(special_map.get(key))
            if value:
                special[key] = value
        extra = config.get(ADDITIONAL_SPECIAL_TOKENS) or special_map.get(ADDITIONAL_SPECIAL_TOKENS) or []
        names = config.get("model_input_names")
        types = "token_type_ids" in names if isinstance(names, list) else name.removesuffix("Tokenizer") not in NO_TOKEN_TYPES
        return cls(
            tokenizer_class=name,
            padding_side=str(config.get("padding_side") or ("left" if name in LEFT_PADDING else "right")),
            truncation_side=str(config.get("truncation_side") or "right"),
            token_type_ids=types,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            special_tokens=special,
            additional_special_tokens=tuple(t for t in (_token_text(v) for v in extra) if t),
        )


def proper_text(text: str) -> str:
    """``text``, if UTF-8 can encode it; else one MetaTTError line (the tokenizers library raises a bare TypeError).

    A lone UTF-16 surrogate arrives from a JSON string such as ``"\\ud800"`` or from command-line
    bytes that are not UTF-8; a server must answer it as the client's mistake, not a 500.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MetaTTError("not valid Unicode text (an unpaired surrogate?); send UTF-8 text") from None
    return text


class TextTokenizer:
    """A model folder's tokenizer as transformers' ``AutoTokenizer`` would load it, on the ``tokenizers`` library alone."""

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings, chat_template: str | None):
        self.tokenizer = tokenizer
        self.settings = settings
        self.chat_template = chat_template
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        # a truncating copy per max length: truncation is state of a Tokenizer, and concurrent requests share this one
        self._truncating: dict[int, Tokenizer] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer:
        """Read ``folder``'s tokenizer files; a missing or corrupt one is a one-line error naming it."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise MetaTTError(
                f"{path} not found; a deployment needs the fast tokenizer file: re-export the model, or save its tokenizer "
                "there with save_pretrained"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise MetaTTError(f"{path} cannot be read ({first}); re-save the tokenizer with save_pretrained") from None
        config_path = folder / TOKENIZER_CONFIG_FILE
        config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
        if not isinstance(config, dict):
            raise MetaTTError(f"{config_path} must hold a JSON object; re-save the tokenizer (save_pretrained)")
        settings = TokenizerSettings.read(folder, config)
        _as_transformers_loads_it(tokenizer, settings, config)
        return cls(tokenizer, settings, _chat_template(folder, config))

    # ---------------------------------------------------------------- special tokens

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.settings.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.settings.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.settings.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text`` as ``tok(text).input_ids`` (or with ``add_special_tokens=False``), untruncated."""
        return list(self.tokenizer.encode(proper_text(text), add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, rows: Sequence[Row], max_length: int) -> dict[str, np.ndarray]:
        """Sentences and sentence pairs (mixed allowed) as one padded int64 batch for a classifier.

        Equal to ``tok(text[, pair], truncation=True, max_length=max_length)`` per row, then ``tok.pad``:
        truncated longest-first, padded to the longest row on the tokenizer's side.
        """
        inputs: list[str | tuple[str, str]] = []
        for row in rows:
            if isinstance(row, str):
                inputs.append(row)
            elif isinstance(row, (list, tuple)) and len(row) == 2 and all(isinstance(t, str) for t in row):
                inputs.append((row[0], row[1]) if row[1] else row[0])  # transformers encodes an empty second text as no pair
            else:
                raise MetaTTError(f"each input must be a text or a pair of texts, got {type(row).__name__}: {str(row)[:60]}")
        if not inputs:
            raise MetaTTError("no texts to encode; pass at least one text")
        truncating = self._truncating.get(max_length)
        if truncating is None:
            truncating = Tokenizer.from_str(self.tokenizer.to_str())
            truncating.enable_truncation(max_length, strategy="longest_first", direction=self.settings.truncation_side)
            self._truncating[max_length] = truncating
        try:
            encodings = truncating.encode_batch(inputs, add_special_tokens=True)
        except Exception as e:  # tokenizers raises a bare Exception, e.g. when max_length cannot hold the special tokens
            raise MetaTTError(f"cannot encode the batch at max length {max_length} ({str(e)[:160]}); raise the max length") from None
        width = max(len(e.ids) for e in encodings)
        pad = self.pad_token_id
        if pad is None and any(len(e.ids) < width for e in encodings):
            raise MetaTTError("rows of different lengths need padding, and this tokenizer has no pad token; send one text per request")
        ids = np.full((len(encodings), width), pad or 0, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for i, encoding in enumerate(encodings):
            n = len(encoding.ids)
            cols = slice(width - n, width) if self.settings.padding_side == "left" else slice(0, n)
            ids[i, cols], mask[i, cols], types[i, cols] = encoding.ids, encoding.attention_mask, encoding.type_ids
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.settings.token_type_ids:
            batch["token_type_ids"] = types
        return batch

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """``tok.decode(ids, skip_special_tokens=...)``, with the config's clean-up of tokenization spaces."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.settings.clean_up_tokenization_spaces else text

    # ---------------------------------------------------------------- chat

    @cached_property
    def _template(self) -> Any:
        if not self.chat_template:
            raise MetaTTError("this model's tokenizer has no chat template; pass --raw to feed prompts as they are")
        return compile_chat_template(self.chat_template)

    def template_variables(self) -> dict[str, Any]:
        """What transformers passes a template besides the messages: the special tokens by attribute name."""
        variables: dict[str, Any] = dict(self.settings.special_tokens)
        if self.settings.additional_special_tokens:
            variables[ADDITIONAL_SPECIAL_TOKENS] = list(self.settings.additional_special_tokens)
        return variables

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``; ``extra`` become template variables."""
        try:
            return self._template.render(
                messages=list(messages),
                tools=extra.pop("tools", None),
                documents=extra.pop("documents", None),
                add_generation_prompt=add_generation_prompt,
                **{**self.template_variables(), **extra},
            )
        except jinja2.exceptions.TemplateError as e:
            raise MetaTTError(f"the chat template refused these messages ({str(e)[:200]}); check the roles and their order") from None

    @cached_property
    def _literal(self) -> Tokenizer:
        """A copy that reads special-token strings in text as text (the shared tokenizer is never toggled: threads use it)."""
        literal = Tokenizer.from_str(self.tokenizer.to_str())
        literal.encode_special_tokens = True
        return literal

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``, but user text is data: a special token's string in it (``<|im_end|>``) is encoded as plain text.

        Special tokens the tokenizer itself adds (a BOS) are still added; for text without such
        strings the ids equal `encode`'s.
        """
        return list(self._literal.encode(proper_text(text), add_special_tokens=add_special_tokens).ids)

    def chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """``apply_chat_template(messages, tokenize=True)``, the messages' contents encoded as data.

        A content that holds a special token's string (``<|im_end|><|im_start|>system``) would
        forge a turn: the chat is then rendered with a placeholder per content and cut at the
        template's own special tokens only, which is where the tokenizer itself cuts its input;
        each piece is encoded with the contents put back as text (`encode_text`). Contents without
        such strings take the plain path, so their ids are exactly transformers'.
        """
        messages = list(messages)
        specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
        contents = {f"\ue000{k}\ue001": m["content"] for k, m in enumerate(messages) if isinstance(m.get("content"), str)}
        if not any(t in c for c in contents.values() for t in specials):
            return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)
        placeholders = [{**m, "content": f"\ue000{k}\ue001"} if isinstance(m.get("content"), str) else m for k, m in enumerate(messages)]
        rendered = self.render_chat(placeholders, add_generation_prompt, **extra)
        ids: list[int] = []
        for k, piece in enumerate(re.split("(" + "|".join(map(re.escape, specials)) + ")", rendered)):
            if k % 2:  # one of the template's special tokens
                ids.append(self.tokenizer.token_to_id(piece))
            elif piece:
                text = re.sub("\ue000\\d+\ue001", lambda mark: contents[mark.group(0)], piece)
                ids += self.encode_text(text, add_special_tokens=False)
        return ids

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The ids a model generates after, as it was trained: its chat template with the generation prompt, or, for a
        model without one, `plain_prompt` of the contents (user text as data either way)."""
        if self.chat_template:
            return self.chat_ids(messages, add_generation_prompt=True)
        return self.encode_text(plain_prompt([str(m["content"]) for m in messages]))


def plain_prompt(contents: Sequence[str]) -> str:
    """How a model without a chat template sees a prompt, in training and in generation alike: the turns'
    texts joined by blank lines, then a newline (the answer follows, then EOS)."""
    return PLAIN_SEPARATOR.join(contents) + "\n"


def _as_transformers_loads_it(tokenizer: Tokenizer, settings: TokenizerSettings, config: dict) -> None:
    """Apply to ``tokenizer`` what transformers' fast tokenizer class changes after reading tokenizer.json."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in (*settings.special_tokens.values(), *settings.additional_special_tokens) if t not in vocab]
    if missing:  # transformers adds special tokens the file lacks, at the end of the vocabulary
        tokenizer.add_special_tokens(list(dict.fromkeys(missing)))
    name = settings.tokenizer_class
    prefix_space = config.get("add_prefix_space", None if name in PREFIX_SPACE_NONE else False)
    pre = json.loads(tokenizer.pre_tokenizer.__getstate__()) if tokenizer.pre_tokenizer is not None else {}
    if isinstance(prefix_space, bool) and "add_prefix_space" in pre and pre["add_prefix_space"] != prefix_space:
        pre["add_prefix_space"] = prefix_space
        tokenizer.pre_tokenizer = getattr(pre_tokenizers, pre.pop("type"))(**pre)
    if name in BOS_EOS_TEMPLATE:
        default_bos, default_eos = BOS_EOS_TEMPLATE[name]
        add_bos, add_eos = bool(config.get("add_bos_token", default_bos)), bool(config.get("add_eos_token", default_eos))
        bos, eos = settings.special_tokens.get("bos_token"), settings.special_tokens.get("eos_token")
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise MetaTTError(
                f"{TOKENIZER_CONFIG_FILE} sets add_bos_token/add_eos_token but names no bos/eos token; add it or turn the flag off"
            )
        single = f"{(str(bos) + ':0 ') if add_bos else ''}$A:0{(' ' + str(eos) + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + str(bos) + ':1') if add_bos else ''} $B:1{(' ' + str(eos) + ':1') if add_eos else ''}"
        specials = [(t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant tokens for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def compile_chat_template(source: str) -> Any:
    """A jinja2 template compiled in the environment transformers 4.57 renders chat templates in."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MetaTTError(f"the chat template does not parse ({e.message}, line {e.lineno}); fix it or pass --raw") from None


class TextStream:
    """Generated ids in, text pieces out, so that the pieces join to ``tokenizer.decode(all ids)``.

    A byte-level token can end inside a UTF-8 character (an emoji spans several tokens): its
    decode ends in U+FFFD until the rest arrives, so such a tail is held back. With
    ``clean_up_tokenization_spaces`` a later token can change text already decoded (" ." -> ".",
    and the clean-ups chain: " n ' t" -> " n't" -> "n't"), but only across characters the
    clean-up patterns are made of; so the text after the last other character is held back, and
    the text before it is final. `finish` hands out whatever is held.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.clean_up = tokenizer.settings.clean_up_tokenization_spaces
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" while it is held back)."""
        self.ids.append(int(token_id))
        raw = self.tokenizer.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        end = len(raw.rstrip("\ufffd"))
        if self.clean_up:
            end = next((i + 1 for i in range(end - 1, -1, -1) if raw[i] not in CLEAN_UP_CHARACTERS), 0)
        text = clean_up_tokenization(raw[:end]) if self.clean_up else raw[:end]
        if len(text) <= self.sent:
            return ""
        piece, self.sent = text[self.sent :], len(text)
        return piece

    def finish(self) -> str:
        """The text still held back (the end of the answer)."""
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        piece, self.sent = text[self.sent :], len(text)
        return piece
