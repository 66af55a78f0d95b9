"""Tests for cluster.text.tokenizer, with sentencepiece and mistral-common as independent references."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.errors import SetupError
from cluster.text.detokenizer import IncrementalDetokenizer
from cluster.text.tokenizer import (
    ChatFormatError,
    Tokenizer,
    default_model_file,
    find_tokenizer_file,
)
from tests import tokenizer_refs as refs

BUNDLED = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BUNDLED_V3 = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello world",
    "  two leading spaces",
    " one leading space",
    " ",
    "\n",
    "trailing spaces   ",
    "中文字符，你好世界。",
    "emoji 😀🎉 and a parrot 🦜",
    "rare CJK 龘𠀋 as byte fallback",
    "mixed: naïve café — 東京 🚀\n\ttabs  and\r\nnewlines",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(None)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(BUNDLED))


@pytest.fixture(scope="module")
def mistral() -> MistralTokenizer:
    return MistralTokenizer.v1()


def byte_id(sp: spm.SentencePieceProcessor, value: int) -> int:
    return sp.piece_to_id(f"<0x{value:02X}>")


# --------------------------------------------------------------------------- loading


def test_default_model_is_bundled_mixtral_tokenizer(tok: Tokenizer) -> None:
    assert default_model_file() == BUNDLED
    assert tok.path == BUNDLED
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert "tokenizer.model.v1" in repr(tok)


def test_from_dir_uses_folder_model(tmp_path: Path, sp: spm.SentencePieceProcessor) -> None:
    shutil.copy(BUNDLED, tmp_path / "tokenizer.model")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.path == tmp_path / "tokenizer.model"
    assert loaded.encode("Hello 中文", bos=False) == sp.encode("Hello 中文")
    assert Tokenizer.from_dir(str(tmp_path)).path == tmp_path / "tokenizer.model"


def test_from_dir_really_reads_the_folder_file(tmp_path: Path) -> None:
    # A different model (v3, 32768 pieces) proves the folder's file wins over the bundled one.
    shutil.copy(BUNDLED_V3, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 32768


def test_from_dir_without_model_falls_back_to_bundled(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path).path == BUNDLED
    assert Tokenizer.from_dir(None).path == BUNDLED


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")


def test_constructor_with_model_file(sp: spm.SentencePieceProcessor) -> None:
    direct = Tokenizer(BUNDLED)
    assert direct.path == BUNDLED
    assert direct.vocab_size == sp.vocab_size()


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece(tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    plain = sp.encode(text)
    assert tok.encode(text) == [1, *plain]
    assert tok.encode(text, bos=False) == plain
    assert tok.encode(text, bos=False, eos=True) == [*plain, 2]
    assert tok.encode(text, bos=True, eos=True) == [1, *plain, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok: Tokenizer, sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == sp.decode(ids) == text


def test_decode_skips_control_tokens_and_strips_first_space(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    hello, world = sp.piece_to_id("▁Hello"), sp.piece_to_id("▁world")
    assert tok.decode([hello, world]) == "Hello world"
    assert tok.decode([1, hello, 2, 1, world, 2]) == "Hello world"
    assert tok.decode([world]) == "world"
    assert tok.decode([]) == ""


def test_decode_byte_fallback_and_invalid_utf8(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    e4, b8, ad = (byte_id(sp, b) for b in (0xE4, 0xB8, 0xAD))
    assert tok.decode([e4, b8, ad]) == "中"
    assert tok.decode([e4, b8]) == REPLACEMENT * 2  # one U+FFFD per invalid byte
    assert tok.decode([e4, b8, 2, ad]) == REPLACEMENT * 3  # a control token splits the byte run


def test_decode_accepts_non_list_ints(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", bos=False)
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "Hello world"


def test_id_to_piece(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert tok.id_to_piece(1) == "<s>"
    assert tok.id_to_piece(2) == "</s>"
    assert tok.id_to_piece(sp.piece_to_id("▁Hello")) == "▁Hello"
    assert tok.id_to_piece(byte_id(sp, 0x0A)) == "<0x0A>"
    assert tok.byte_value(byte_id(sp, 0x0A)) == 0x0A
    assert tok.byte_value(sp.piece_to_id("▁Hello")) is None
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


# --------------------------------------------------------------------------- chat format

_MC_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello"}],
    "user_assistant_user": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Answer in French.\nBe brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Bien, merci."},
        {"role": "user", "content": "Bye"},
    ],
    "unicode_and_whitespace": [
        {"role": "user", "content": "  leading and trailing  "},
        {"role": "assistant", "content": " 中文 😀\nsecond line "},
        {"role": "user", "content": "龘 🦜\n\n"},
    ],
    "empty_user_content": [{"role": "user", "content": ""}],
    "extra_keys_ignored": [{"role": "user", "content": "Hi", "name": "bob"}],
}


def mistral_reference(mistral: MistralTokenizer, messages: list[dict]) -> list[int]:
    request = ChatCompletionRequest(messages=[_MC_CLASSES[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_matches_mistral_common(tok: Tokenizer, mistral: MistralTokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    assert tok.encode_chat(messages) == mistral_reference(mistral, messages)


def test_encode_chat_layout(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    # Hand-built expectation, independent of mistral-common: each turn is tokenized on its own.
    ids = tok.encode_chat(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]
    )
    expected = [1, *sp.encode("[INST] Hi [/INST]"), *sp.encode("Hello!"), 2, *sp.encode("[INST] Bye [/INST]")]
    assert ids == expected
    assert tok.decode(ids) == "[INST] Hi [/INST] Hello! [INST] Bye [/INST]"


def test_encode_chat_system_prompt_goes_to_first_user_message(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = tok.encode_chat(
        [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ]
    )
    expected = [
        1,
        *sp.encode("[INST] SYS\n\none [/INST]"),
        *sp.encode("two"),
        2,
        *sp.encode("[INST] three [/INST]"),
    ]
    assert ids == expected


def test_encode_chat_empty_system_prompt_is_ignored(tok: Tokenizer) -> None:
    with_empty = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert tok.encode_chat(with_empty) == tok.encode_chat(with_empty[1:])


_U = {"role": "user", "content": "u"}
_A = {"role": "assistant", "content": "a"}
_S = {"role": "system", "content": "s"}


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], r"messages is empty"),
        ([_U, _U], r"message 1: expected role 'assistant' but got 'user'"),
        ([_A, _U], r"message 0: expected role 'user' but got 'assistant'"),
        ([_S, _A, _U], r"message 1: expected role 'user' but got 'assistant'"),
        ([_U, _A], r"message 1: the conversation must end with a user message"),
        ([_U, _A, _U, _A, _A], r"message 4: expected role 'user' but got 'assistant'"),
        ([_U, _S, _A, _U], r"message 1: a system message is only allowed as the first message"),
        ([_S, _S, _U], r"message 1: a system message is only allowed as the first message"),
        ([_S], r"no user message"),
        ([{"role": "tool", "content": "x"}], r"message 0: a tool result \(role 'tool'\): .*has no tool calls"),
        ([_U, {"role": "bot", "content": "x"}], r"message 1: unknown role 'bot'"),
        ([{"content": "x"}], r"message 0: unknown role None"),
        ([{"role": "user", "content": None}], r"message 0: content must be a string, got NoneType"),
        ([{"role": "user", "content": ["x"]}], r"message 0: content must be a string, got list"),
        ([_U, {"role": "assistant", "content": ""}, _U], r"message 1: assistant message has empty content"),
        ([_U, "not a mapping"], r"message 1: expected a mapping"),
        ("user: hi", r"messages must be a list"),
    ],
)
def test_encode_chat_errors(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match) as err:
        tok.encode_chat(messages)
    assert err.value.param == "messages"  # the request field the serving edge reports


# --------------------------------------------------------------------------- incremental detokenizer


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """Feed ids one by one, checking at every step that the output so far is final."""
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for k, token_id in enumerate(ids, start=1):
        deltas.append(detok.add(token_id))
        # Nothing emitted may change later: it is a prefix of what decode gives right now.
        assert tok.decode(ids[:k]).startswith(detok.text)
    tail = detok.flush()
    assert detok.token_ids == list(ids)
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def check_stream(tok: Tokenizer, ids: list[int]) -> None:
    deltas, tail = stream(tok, ids)
    expected = tok.decode(ids)
    assert "".join(deltas) + tail == expected, ids
    pos = 0
    for delta in [*deltas, tail]:
        # each delta (U+FFFD included) sits exactly where decode(ids) has it
        assert expected[pos : pos + len(delta)] == delta, ids
        pos += len(delta)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_texts(tok: Tokenizer, text: str) -> None:
    check_stream(tok, tok.encode(text, bos=False))
    check_stream(tok, tok.encode(text, bos=True, eos=True))


def test_stream_leading_space_is_dropped_like_decode(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", bos=False)
    deltas, tail = stream(tok, ids)
    assert deltas == ["Hello", " world"]
    assert tail == ""


def test_stream_controls_in_the_middle(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    hello, world, space = sp.piece_to_id("▁Hello"), sp.piece_to_id("▁world"), sp.piece_to_id("▁")
    for ids in (
        [1, hello, 2, world],
        [2, 2, hello, 1, 1, world, 2],
        [space, hello, 2, world],
        [2, space, 2, hello],
        [hello, 2, 2, 2, space, world],
    ):
        check_stream(tok, ids)
    deltas, _ = stream(tok, [2, hello, 2, world])
    assert deltas == ["", "Hello", "", " world"]


def test_stream_multibyte_characters_wait_for_all_bytes(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    e4, b8, ad = (byte_id(sp, b) for b in (0xE4, 0xB8, 0xAD))
    a = sp.piece_to_id("▁a")
    deltas, tail = stream(tok, [a, e4, b8, ad, a])
    assert deltas == ["a", "", "", "中", " a"]
    assert tail == ""
    emoji = [byte_id(sp, b) for b in "🦜".encode()]
    deltas, tail = stream(tok, emoji)
    assert deltas == ["", "", "", "🦜"]
    # incomplete at the end: flush renders it like decode does
    deltas, tail = stream(tok, [a, e4, b8])
    assert deltas == ["a", "", ""]
    assert tail == REPLACEMENT * 2
    # a sequence broken by a non-continuation byte is final at once
    deltas, tail = stream(tok, [e4, byte_id(sp, 0x41), b8])
    assert "".join(deltas) == REPLACEMENT + "A" + REPLACEMENT
    assert tail == ""


def _random_sequences(sp: spm.SentencePieceProcessor) -> list[list[int]]:
    rng = random.Random(20240601)
    vocab_size = sp.vocab_size()
    sequences = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 60))] for _ in range(150)]
    # byte-heavy sequences: lots of byte-fallback pieces (valid and invalid UTF-8) mixed with controls,
    # "▁"-pieces and ordinary words
    specials = [0, 1, 2, *(sp.piece_to_id(p) for p in ("▁", "▁▁", "▁Hello", "world", "�"))]
    leads = [0xC3, 0xE4, 0xF0, 0xE0, 0xED, 0xF4, 0xC0, 0xF8]
    for _ in range(250):
        seq = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.35:
                seq.append(3 + rng.choice(leads))
            elif r < 0.75:
                seq.append(3 + rng.randrange(0x80, 0xC0))  # continuation bytes
            elif r < 0.85:
                seq.append(3 + rng.randrange(256))
            else:
                seq.append(rng.choice(specials))
        sequences.append(seq)
    return sequences


def test_stream_random_sequences(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert [sp.is_byte(i) for i in (3, 258)] == [True, True] and sp.id_to_piece(3) == "<0x00>"
    saw_replacement = 0
    for ids in _random_sequences(sp):
        assert tok.decode(ids) == sp.decode(ids)
        check_stream(tok, ids)
        saw_replacement += REPLACEMENT in tok.decode(ids)
    assert saw_replacement > 100  # the test really exercises invalid UTF-8


def test_stream_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "Streaming 中文 and emoji 🦜😀 should stay cheap per token. " * 60
    ids = tok.encode(text, bos=False)
    assert len(ids) > 1000
    sizes: list[int] = []
    real_decode = tok.decode

    def recording_decode(window: list[int]) -> str:
        sizes.append(len(window))
        return real_decode(window)

    detok = IncrementalDetokenizer(tok)
    monkeypatch.setattr(tok, "decode", recording_decode)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    monkeypatch.undo()
    assert out == tok.decode(ids) == text
    assert max(sizes) <= 10
    assert len(sizes) <= 2 * len(ids) + 2


def test_detokenizer_api(tok: Tokenizer) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert detok.prompt_ids == prompt
    assert detok.text == ""
    assert detok.token_ids == []
    ids = tok.encode("Hello there", bos=False)
    for i in ids:
        detok.add(i)
    assert detok.text == "Hello there"  # the prompt is not part of the output
    assert detok.token_ids == ids
    assert detok.flush() == ""
    assert detok.flush() == ""
    with pytest.raises(RuntimeError, match="after flush"):
        detok.add(ids[0])
    with pytest.raises(IndexError):
        IncrementalDetokenizer(tok).add(tok.vocab_size)
    with pytest.raises(IndexError):
        IncrementalDetokenizer(tok).add(-1)


# --------------------------------------------------------------------------- which file of a folder is the tokenizer

MISTRAL_TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
CHATML_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def make_folder(folder: Path, names: list[str], template: str | None = None) -> Path:
    """A folder of empty stand-in files (find_tokenizer_file only looks at names) and a tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    if template is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


@pytest.mark.parametrize(
    ("names", "template", "expected"),
    [
        (["tokenizer.model", "tekken.json", "tokenizer.json"], None, "tekken.json"),
        (["tokenizer.model", "tokenizer.model.v3", "tokenizer.json"], None, "tokenizer.model.v3"),
        (["tokenizer.model.v3", "tokenizer.model.v7", "tokenizer.model.v1"], None, "tokenizer.model.v7"),
        (["tokenizer.model.v3", "tekken_240911.json"], None, "tokenizer.model.v3"),
        (["tekken_240911.json", "tokenizer.model"], None, "tekken_240911.json"),
        (["tokenizer.model", "tokenizer.json"], None, "tokenizer.model"),
        (["tokenizer.model", "tokenizer.json"], MISTRAL_TEMPLATE, "tokenizer.model"),
        (["tokenizer.model", "tokenizer.json"], CHATML_TEMPLATE, "tokenizer.json"),  # a fine-tune's own format
        (["tokenizer.model"], CHATML_TEMPLATE, "tokenizer.model"),  # no tokenizer.json to go with the template
        (["tokenizer.json"], None, "tokenizer.json"),
        (["tokenizer.model.v99", "config.json", "model.safetensors"], None, None),
    ],
)
def test_find_tokenizer_file_order(
    tmp_path: Path, names: list[str], template: str | None, expected: str | None
) -> None:
    found = find_tokenizer_file(make_folder(tmp_path / "m", names, template))
    assert (found.name if found else None) == expected


def test_unusable_foreign_template_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_folder(tmp_path / "m", ["tokenizer.model"], CHATML_TEMPLATE)
    with caplog.at_level(logging.INFO, logger="mixserve"):
        assert find_tokenizer_file(folder) == folder / "tokenizer.model"
    [record] = [r for r in caplog.records if r.name == "mixserve"]
    assert record.levelno == logging.WARNING and "not Mistral's" in record.getMessage()


def test_fallback_to_bundled_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="mixserve"):
        assert Tokenizer.from_dir(tmp_path).path == BUNDLED
    [record] = [r for r in caplog.records if r.name == "mixserve"]
    assert record.levelno == logging.WARNING
    assert str(tmp_path) in record.getMessage() and "bundled Mixtral-8x7B tokenizer" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mixserve"):
        shutil.copy(BUNDLED, tmp_path / "tokenizer.model")
        assert Tokenizer.from_dir(tmp_path).path == tmp_path / "tokenizer.model"
    assert not [r for r in caplog.records if "bundled" in r.getMessage()]


def test_override_file_or_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(BUNDLED_V3, folder / "tokenizer.model.v3")
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(BUNDLED, model / "tokenizer.model")
    assert Tokenizer.from_dir(model, tokenizer=folder).path == folder / "tokenizer.model.v3"
    assert Tokenizer.from_dir(None, tokenizer=folder / "tokenizer.model.v3").version == "v3"
    with pytest.raises(FileNotFoundError, match="neither a tokenizer file nor a folder with one"):
        Tokenizer.from_dir(model, tokenizer=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a tokenizer file nor a folder with one"):
        Tokenizer.from_dir(model, tokenizer=make_folder(tmp_path / "empty", ["config.json"]))


def test_versions_and_kinds(tmp_path: Path) -> None:
    assert (Tokenizer(BUNDLED).kind, Tokenizer(BUNDLED).version) == ("sentencepiece", "v1")
    for name, version in [("v2", "v2"), ("v3", "v3"), ("v7", "v7")]:
        tok = refs.mixserve(name)
        assert (tok.kind, tok.version, tok.vocab_size, tok.bos_id, tok.eos_id) == (
            "sentencepiece",
            version,
            32768,
            1,
            2,
        )
    tekken = refs.mixserve("tekken")
    assert (tekken.kind, tekken.version, tekken.vocab_size, tekken.bos_id, tekken.eos_id) == (
        "tekken",
        "v3",
        131072,
        1,
        2,
    )
    # an unversioned file is read by its control tokens, and keeps its version across pickling (Ray)
    shutil.copy(BUNDLED_V3, tmp_path / "tokenizer.model")
    plain = Tokenizer.from_dir(tmp_path)
    assert plain.version == "v3"
    assert pickle.loads(pickle.dumps(plain)).version == "v3"
    assert "version=v3" in repr(plain)


def test_broken_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(SetupError, match="not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------- every bundled version: text, pieces, streams

VERSIONS = ["v2", "v3", "v7", "tekken"]


@pytest.mark.parametrize("name", VERSIONS)
def test_encode_decode_match_mistral_common(name: str) -> None:
    tok, raw = refs.mixserve(name), refs.reference(name).instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, bos=True, eos=False)
        assert tok.encode(text, bos=False, eos=True) == raw.encode(text, bos=False, eos=True)
        assert tok.decode(ids) == raw.decode(ids) == text
        assert [tok.id_to_piece(i) for i in ids] == [raw.id_to_piece(i) for i in ids]
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])
    with pytest.raises(IndexError):
        tok.id_to_piece(-1)


@pytest.mark.parametrize("name", VERSIONS)
def test_byte_pieces(name: str) -> None:
    tok = refs.mixserve(name)
    ids = tok.encode("rare CJK 龘𠀋 and 🦜", bos=False)
    byte_ids = [i for i in ids if tok.byte_value(i) is not None]
    assert byte_ids, "the text must exercise byte fallback / byte tokens"
    assert b"".join(tok.piece_bytes(i) or b"" for i in ids).decode().strip() == "rare CJK 龘𠀋 and 🦜"
    assert tok.piece_bytes(tok.eos_id) is None and tok.byte_value(tok.eos_id) is None
    assert tok.special_id("[INST]") == 3 and tok.special_id("[TOOL_CALLS]") is not None
    assert tok.special_id("Hello") is None


@pytest.mark.parametrize("name", VERSIONS)
def test_stream_texts_every_version(name: str) -> None:
    tok = refs.mixserve(name)
    for text in TEXTS:
        check_stream(tok, tok.encode(text, bos=False))
        check_stream(tok, tok.encode(text, bos=True, eos=True))


def test_stream_tekken_partial_utf8_tokens() -> None:
    tok = refs.mixserve("tekken")
    ids = tok.encode("🦜", bos=False)
    assert len(ids) > 1 and all(tok.decode([i]) != "🦜" for i in ids)  # the emoji spans byte-level tokens
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) == "🦜" and deltas[-1] == "🦜" and tail == ""
    rng = random.Random(7)
    saw_replacement = 0
    for _ in range(120):
        seq = [rng.randrange(tok.vocab_size) if rng.random() < 0.7 else rng.randrange(1000, 1256) for _ in range(30)]
        seq += [rng.randrange(0, 20) for _ in range(rng.randint(0, 2))]  # special tokens split byte runs
        rng.shuffle(seq)
        check_stream(tok, seq)
        saw_replacement += REPLACEMENT in tok.decode(seq)
    assert saw_replacement > 20


def test_stream_v3_random_sequences() -> None:
    tok = refs.mixserve("v3")
    rng = random.Random(11)
    for _ in range(150):
        check_stream(
            tok, [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.randrange(3, 1100) for _ in range(30)]
        )
