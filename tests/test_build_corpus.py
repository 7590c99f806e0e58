"""data_prep/build_corpus.py: cleaning, deduplication, bad input, packed blocks, tokenizers, determinism (CPU, fast)."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from data_prep.build_corpus import (CorpusConfig, main, normalize_text, read_document,
                                    strip_headers_footers)
from semivlm.config import load_config

DEFAULT_CORPUS = REPO / "data" / "corpus"
WORDS = ("wafer etch resist oxide nitride plasma anneal implant dose energy mask overlay focus exposure pitch spacer "
         "trench via copper barrier seed liner slurry pad carrier chamber pressure flow bias chuck beam detector "
         "contrast lamella grain boundary void seam residue particle scratch crack bump pillar solder die").split()


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per entry, top to bottom, one list per page."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        stream = "BT /F1 11 Tf 14 TL 72 760 Td " + " ".join(f"({esc(line)}) Tj T*" for line in lines) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {page_ids[i] + 1} 0 R >>".encode())
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream".encode())
    out, offsets = b"%PDF-1.4\n", []
    for k, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def paper_pages() -> list[list[str]]:
    """Four pages with a running header, page numbers in four styles and a word hyphenated across a line break."""
    footers = ["Page 1", "- 2 -", "3 of 4", "4"]
    pages = []
    for i in range(4):
        body = [f"Section {i + 1} discusses the {words(6, i)} results.",
                f"The measured value {40 + i} nm agrees with the model for {words(5, 10 + i)}."]
        if i == 1:
            body += ["Charge trapping in the semi-", "conductor layer shifts the threshold voltage."]
        pages.append(["Journal of Wafer Science, Vol. 12", *body, footers[i]])
    return pages


def load_blocks(path: Path) -> np.ndarray:
    import datasets
    ds = datasets.load_from_disk(str(path))
    assert ds.column_names == ["input_ids"]
    return np.array(ds["input_ids"], dtype=np.int64)


def docs_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "corpus"
    stats = main(CorpusConfig(out=str(out), inputs=[str(DEFAULT_CORPUS)]))
    return out, stats


# ------------------------------------------------------------------------------------------------ cleaning
def test_pdf_cleaning_dehyphenates_and_removes_headers_footers_and_page_numbers(tmp_path):
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(make_pdf(paper_pages()))
    text, reason = read_document(str(pdf))
    assert reason == "" and text
    assert "semiconductor layer" in text and "semi-" not in text
    assert "Journal of Wafer Science" not in text
    for page_number in ("Page 1", "- 2 -", "3 of 4"):
        assert page_number not in text
    assert not any(line.strip() == "4" for line in text.splitlines())
    assert "The measured value 42 nm" in text                      # numbers inside the body stay
    assert all(f"Section {i} discusses" in text for i in range(1, 5))


def test_header_removal_keeps_lines_that_do_not_recur_across_pages():
    names = ["alpha", "beta", "gamma", "delta"]
    pages = [f"Opening on {n}\n{words(8, i)}\nClosing on {n}\nProc. Wafer Conf. 2024, p. {17 + i}"
             for i, n in enumerate(names)]
    joined = strip_headers_footers(pages)
    assert "Proc. Wafer Conf." not in joined                        # recurs, up to its numbers, on every page
    assert all(f"Opening on {n}" in joined and f"Closing on {n}" in joined for n in names)


def test_whitespace_normalisation_joins_soft_breaks_keeps_paragraphs_and_drops_control_characters():
    raw = ("Title  line\r\n\r\nFirst   paragraph wraps\nonto a second\tline.\x00\x07\n\n\n\n"
           "Second paragraph with a \ufb01ne ligature and a soft\u00adhyphen.\n- item one\n  continues\n- item two\n")
    assert normalize_text(raw) == ("Title line\n\nFirst paragraph wraps onto a second line.\n\n"
                                   "Second paragraph with a fine ligature and a softhyphen.\n"
                                   "- item one continues\n- item two")


def test_markdown_headings_and_code_fences_survive_normalisation():
    raw = "# Heading\nText under it\nwraps.\n\n```\ncode   keeps  spacing\n\n    indented\n```\nAfter."
    assert normalize_text(raw) == "# Heading\nText under it wraps.\n\n```\ncode   keeps  spacing\n\n    indented\n```\nAfter."


# ------------------------------------------------------------------------------------------ deduplication
def test_exact_and_near_duplicates_are_removed_and_a_different_document_is_kept(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    base = words(400, 1)
    near = base.split()
    for i in (50, 150, 250):                                        # three words changed
        near[i] = "changed"
    (inp / "a.md").write_text(base)
    (inp / "b_exact.txt").write_text("  " + base.replace(" ", "\n", 5).upper() + "\n")
    (inp / "c_near.md").write_text(" ".join(near))
    (inp / "d_other.md").write_text(words(400, 2))
    (inp / "e_other.txt").write_text(words(400, 3))
    stats = main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(inp)], block_size=32, vocab_size=300))
    assert stats["duplicates_removed"] == {"exact": 1, "near": 1}
    assert sorted(Path(d["source"]).name for d in docs_of(tmp_path / "out")) == ["a.md", "d_other.md", "e_other.txt"]
    assert stats["documents_kept"] == 3


def reference_minhash(text: str, shingle: int = 5, num_perm: int = 128) -> list[int]:
    """MinHash as its docstring defines it, in plain Python integers: the set of word 5-grams (each the polynomial
    mod 2^64 of its words' CRC32s; fewer words than a shingle make one gram), then per permutation the min over the
    set of ((a*x + b) mod 2^64) >> 32."""
    import re
    import zlib

    from data_prep.build_corpus import _hash_params

    h = [zlib.crc32(w.encode()) for w in re.findall(r"\w+", text.lower())]
    grams = set()
    for i in range(max(1, len(h) - shingle + 1)):
        v = 0
        for k in range(min(shingle, len(h))):
            v = (v * 0x100000001B3 + h[i + k]) % 2**64
        grams.add(v)
    a, b = (p.tolist() for p in _hash_params(num_perm))
    return [min(((aj * x + bj) % 2**64) >> 32 for x in grams) for aj, bj in zip(a, b)]


def test_minhash_equals_the_plain_python_definition_on_short_long_repeated_and_non_ascii_text():
    """The numpy signature (in-place buffer of 1024 grams, shift after the min, no np.unique) is bit-identical to the
    definition: near-duplicate decisions do not depend on the fast path."""
    from data_prep.build_corpus import minhash

    texts = ["", "three short words", words(1024 + 4, 7),                   # 1024 grams: exactly one full buffer
             words(2500, 8), (words(300, 9) + " ") * 4,                  # > 2 buffers; every gram repeated 4 times
             "Ätzrate der Schicht: 日本語 の テキスト, naïve façade " + words(40, 10)]
    for text in texts:
        sig = minhash(text)
        assert sig.dtype == np.uint64 and sig.shape == (128,)
        assert sig.tolist() == reference_minhash(text), text[:40]
    assert minhash(texts[3]).tolist() != minhash(texts[2]).tolist()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_skipped_counted_by_reason_and_named_while_the_run_continues(tmp_path, capsys):
    import pypdf

    inp = tmp_path / "in"
    inp.mkdir()
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(make_pdf(paper_pages())))
    writer.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    (inp / "encrypted.pdf").write_bytes(buf.getvalue())
    (inp / "corrupt.pdf").write_bytes(random.Random(0).randbytes(4000))
    (inp / "scanned.pdf").write_bytes(make_pdf([[], []]))
    (inp / "good.pdf").write_bytes(make_pdf(paper_pages()))
    (inp / "empty.txt").write_text("  \n\n \t \n")
    (inp / "zero.md").write_bytes(b"")
    (inp / "latin1.txt").write_bytes(("Ätzrate über Öfen für Größe " * 40).encode("latin-1"))
    (inp / "short.md").write_text("too short to keep")
    (inp / "image.png").write_bytes(b"\x89PNG\r\n")
    (inp / "slightly_damaged.txt").write_bytes(words(300, 4).encode() + b" \xff " + words(300, 5).encode())
    for name in ("01_substrate_preparation.md", "05_planarization.md"):
        (inp / name).write_text((DEFAULT_CORPUS / name).read_text())

    stats = main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(inp)], vocab_size=512, block_size=64))
    log = capsys.readouterr().out
    expected = {"encrypted": "encrypted.pdf", "unreadable_pdf": "corrupt.pdf", "pdf_no_text": "scanned.pdf",
                "empty": "empty.txt", "zero_bytes": "zero.md", "non_utf8": "latin1.txt", "too_short": "short.md"}
    assert stats["skipped"] == {**dict.fromkeys(expected, 1), "unsupported_extension": 1}
    for reason, name in expected.items():
        assert f"skip {inp / name}: {reason}" in log
    kept = {Path(d["source"]).name: d for d in docs_of(tmp_path / "out")}
    assert set(kept) == {"good.pdf", "slightly_damaged.txt", "01_substrate_preparation.md", "05_planarization.md"}
    assert kept["good.pdf"]["format"] == "pdf" and kept["slightly_damaged.txt"]["format"] == "txt"
    assert "\ufffd" not in kept["slightly_damaged.txt"]["text"] and stats["notes"] == {"decoded_lossy": 1}
    assert stats["files_seen"] == 12 == stats["documents_kept"] + sum(stats["skipped"].values())


def test_missing_input_path_stops_with_a_message_naming_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(SystemExit) as e:
        main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(missing)]))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_nonexistent_tokenizer_directory_stops_with_a_message_naming_it(tmp_path):
    missing = tmp_path / "no_tokenizer_here"
    with pytest.raises(SystemExit) as e:
        main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(DEFAULT_CORPUS)], tokenizer=str(missing)))
    assert str(missing) in str(e.value)
    assert not (tmp_path / "out").exists()                          # failed before any work


def test_tokenizer_without_eos_stops_with_a_clear_message(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "wafer": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "no_eos")
    with pytest.raises(SystemExit) as e:
        main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(DEFAULT_CORPUS)], tokenizer=str(tmp_path / "no_eos")))
    assert "no_eos" in str(e.value) and "EOS" in str(e.value)


def test_unknown_config_key_and_missing_out_stop_with_messages_naming_them(tmp_path):
    with pytest.raises(SystemExit) as e:
        load_config(CorpusConfig, ["--out", "x", "--vocab_sise", "100"])
    assert "vocab_sise" in str(e.value)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("out: x\nblock_sizes: 64\n")
    with pytest.raises(SystemExit) as e:
        load_config(CorpusConfig, ["--config", str(yaml_file)])
    assert "block_sizes" in str(e.value) and str(yaml_file) in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(load_config(CorpusConfig, []))
    assert "--out" in str(e.value)


def test_command_line_accepts_one_input_path_or_a_list():
    assert load_config(CorpusConfig, ["--out", "o", "--inputs", "/data/papers"]).inputs == ["/data/papers"]
    assert load_config(CorpusConfig, ["--out", "o", "--inputs", "[a, b]"]).inputs == ["a", "b"]


def test_script_reports_config_errors_without_a_traceback(tmp_path):
    script = REPO / "data_prep" / "build_corpus.py"
    for args, needle in ((["--vocab_sise", "10"], "vocab_sise"), (["--inputs", str(tmp_path / "gone")], "gone")):
        r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o"), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_too_small_corpus_stops_with_a_clear_message(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        (inp / f"{i}.md").write_text(words(60, i))
    with pytest.raises(SystemExit) as e:
        main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(inp)], block_size=1024, vocab_size=300))
    assert "too small" in str(e.value)


def test_validation_gets_at_least_one_block_even_with_zero_val_fraction(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(8):
        (inp / f"{i}.md").write_text(words(60, 100 + i))
    stats = main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(inp)], block_size=128, vocab_size=300,
                              val_fraction=0.0))
    assert stats["splits"]["validation"]["blocks"] >= 1 and stats["splits"]["train"]["blocks"] >= 1
    assert len(load_blocks(tmp_path / "out" / "validation")) == stats["splits"]["validation"]["blocks"]


# ------------------------------------------------------------------------------ default corpus, trained BPE
def split_documents(blocks: np.ndarray, eos: int) -> list[list[int]]:
    flat = blocks.ravel().tolist()
    cuts = [i for i, t in enumerate(flat) if t == eos]
    starts = [0] + [c + 1 for c in cuts]
    return [flat[s:c] for s, c in zip(starts, cuts)]              # complete documents only


def test_default_corpus_blocks_are_block_size_long_and_eos_separates_documents(default_run):
    from transformers import AutoTokenizer

    out, stats = default_run
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    docs = docs_of(out)
    for split in ("train", "validation"):
        blocks = load_blocks(out / split)
        assert blocks.shape == (stats["splits"][split]["blocks"], 256)
        texts = {d["text"] for d in docs if d["split"] == split}
        complete = split_documents(blocks, tok.eos_token_id)
        assert len(complete) >= len(texts) - 1 >= 0
        for ids in complete:                                        # every EOS-delimited span is one whole document
            assert tok.decode(ids) in texts
        assert len({tok.decode(ids) for ids in complete}) == len(complete)


def test_default_corpus_train_and_validation_are_disjoint_by_document(default_run):
    from transformers import AutoTokenizer

    out, stats = default_run
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    docs = docs_of(out)
    val_texts = {d["text"] for d in docs if d["split"] == "validation"}
    train_texts = {d["text"] for d in docs if d["split"] == "train"}
    assert val_texts and train_texts and not val_texts & train_texts
    train_blocks = load_blocks(out / "train")
    for ids in split_documents(train_blocks, tok.eos_token_id):
        assert tok.decode(ids) not in val_texts
    head = tok.decode(load_blocks(out / "validation").ravel()[:50].tolist())
    assert any(t.startswith(head) for t in val_texts)                # validation starts with a held-out document


def test_default_corpus_stats_add_up(default_run):
    from transformers import AutoTokenizer

    out, stats = default_run
    assert json.loads((out / "stats.json").read_text()) == stats
    assert json.loads((out / "config.json").read_text())["block_size"] == 256
    assert stats["documents_kept"] == 11 and stats["unsupported_extensions"] == {"(none)": 1}     # LICENSE
    assert stats["files_seen"] == (stats["documents_kept"] + sum(stats["skipped"].values())
                                   + sum(stats["duplicates_removed"].values()))
    docs = docs_of(out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    for split, s in stats["splits"].items():
        members = [d for d in docs if d["split"] == split]
        assert s["documents"] == len(members)
        assert all(d["n_chars"] == len(d["text"]) for d in members) and s["chars"] == sum(d["n_chars"] for d in members)
        assert s["tokens"] == sum(len(tok(d["text"], add_special_tokens=False)["input_ids"]) + 1 for d in members)
        assert s["tokens"] == s["blocks"] * 256 + s["dropped_tokens"] and 0 <= s["dropped_tokens"] < 256
    assert stats["chars"] == sum(d["n_chars"] for d in docs) > 100_000
    assert stats["tokens"] == sum(s["tokens"] for s in stats["splits"].values())
    assert stats["tokenizer"]["eos_token"] == "<|endoftext|>"


def test_trained_tokenizer_reloads_and_its_chat_template_masks_exactly_the_assistant_turns(default_run):
    from transformers import AutoTokenizer

    out, _ = default_run
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>") and tok.eos_token_id != tok.pad_token_id
    for special in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok("Etch the oxide.")["input_ids"] == tok("Etch the oxide.", add_special_tokens=False)["input_ids"]
    answers = ["A line-space pattern at 40 nm pitch with mild bridging.", "Roughly 3 nm of LER (3 sigma)."]
    msgs = [{"role": "system", "content": "You are a fab assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does this SEM show?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
            {"role": "user", "content": "And the edge roughness?"},
            {"role": "assistant", "content": answers[1]}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a fab assistant.<|im_end|>\n"
                        "<|im_start|>user\n<image>\nWhat does this SEM show?<|im_end|>\n"
                        f"<|im_start|>assistant\n{answers[0]}<|im_end|>\n"
                        "<|im_start|>user\nAnd the edge roughness?<|im_end|>\n"
                        f"<|im_start|>assistant\n{answers[1]}<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What does this SEM show?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask) and tok.decode(ids) == rendered
    spans, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    assert [tok.decode(s) for s in spans] == [a + "<|im_end|>" for a in answers]


# ------------------------------------------------------------------------------------ user-given tokenizers
def small_corpus(tmp_path: Path) -> Path:
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("03_patterning.md", "06_cleaning.md", "11_glossary.md"):
        (inp / name).write_text((DEFAULT_CORPUS / name).read_text())
    return inp


def test_user_tokenizer_directory_is_used_and_copied_to_out(default_run, tmp_path):
    from transformers import AutoTokenizer

    user_dir = tmp_path / "user_tok"
    AutoTokenizer.from_pretrained(default_run[0] / "tokenizer").save_pretrained(user_dir)
    out = tmp_path / "out"
    stats = main(CorpusConfig(out=str(out), inputs=[str(small_corpus(tmp_path))], tokenizer=str(user_dir)))
    assert stats["tokenizer"]["source"] == str(user_dir)
    user, copied = AutoTokenizer.from_pretrained(user_dir), AutoTokenizer.from_pretrained(out / "tokenizer")
    assert copied.get_vocab() == user.get_vocab() and copied.chat_template == user.chat_template
    text = docs_of(out)[0]["text"]
    assert copied(text)["input_ids"] == user(text, add_special_tokens=False)["input_ids"]


def test_sentencepiece_tokenizer_is_used_with_its_own_eos_and_copied_to_out(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer, LlamaTokenizer

    inp = small_corpus(tmp_path)
    lines = [line for f in sorted(inp.iterdir()) for line in f.read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=600,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(tmp_path / "spm").save_pretrained(tmp_path / "llama_tok")
    out = tmp_path / "out"
    main(CorpusConfig(out=str(out), inputs=[str(inp)], vocab_size=300, block_size=128))      # a trained one first
    assert (out / "tokenizer" / "chat_template.jinja").exists()
    stats = main(CorpusConfig(out=str(out), inputs=[str(inp)], tokenizer=str(tmp_path / "llama_tok"), block_size=128))
    copied = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert type(copied).__name__ == "LlamaTokenizer" == stats["tokenizer"]["class"]
    assert copied.eos_token == "</s>" and stats["tokenizer"]["eos_token_id"] == copied.eos_token_id == 2
    blocks = load_blocks(out / "train")
    assert blocks.shape[1] == 128 and (blocks == 2).sum() >= 1 and blocks.max() < len(copied)
    assert not (out / "tokenizer" / "chat_template.jinja").exists()   # nothing left from the earlier run


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_blocks_and_tokenizer(default_run, tmp_path):
    out0, stats0 = default_run
    out1 = tmp_path / "again"
    stats1 = main(CorpusConfig(out=str(out1), inputs=[str(DEFAULT_CORPUS)]))
    for split in ("train", "validation"):
        assert np.array_equal(load_blocks(out0 / split), load_blocks(out1 / split))
    assert (out0 / "tokenizer" / "tokenizer.json").read_text() == (out1 / "tokenizer" / "tokenizer.json").read_text()
    assert [d["split"] for d in docs_of(out0)] == [d["split"] for d in docs_of(out1)]
    assert stats0["splits"] == stats1["splits"]


def test_parallel_reading_gives_the_same_documents(tmp_path):
    inp = small_corpus(tmp_path)
    (inp / "paper.pdf").write_bytes(make_pdf(paper_pages()))
    one = main(CorpusConfig(out=str(tmp_path / "one"), inputs=[str(inp)], vocab_size=512))
    two = main(CorpusConfig(out=str(tmp_path / "two"), inputs=[str(inp)], vocab_size=512, num_workers=2))
    assert docs_of(tmp_path / "one") == docs_of(tmp_path / "two") and one["splits"] == two["splits"]


# ------------------------------------------------------------------------------------------- streaming at scale
def test_streamed_blocks_are_the_kept_documents_in_split_order_with_eos_across_shards(tmp_path, monkeypatch):
    """Tiny flush, batch and shard sizes force many tasks, flushes and shards: the blocks, read back through
    load_from_disk (memory-mapped), are still the kept documents of each split, in the seeded order, each tokenised
    and followed by EOS, cut into block_size rows with the last partial row dropped."""
    import datasets
    from transformers import AutoTokenizer

    import data_prep.build_corpus as bc

    monkeypatch.setattr(bc, "BATCH_CHARS", 3000)
    monkeypatch.setattr(bc, "FLUSH_TOKENS", 500)
    monkeypatch.setattr(bc, "SHARD_BYTES", 4 * 64 * 7)             # 7 blocks a shard
    inp = small_corpus(tmp_path)
    for i in range(12):
        (inp / f"gen{i}.txt").write_text(words(300 + 40 * i, 200 + i))
    (inp / "gen0_again.md").write_text(words(300, 200).upper())   # an exact duplicate
    tokenizer_calls = []
    real_train = bc.train_tokenizer
    monkeypatch.setattr(bc, "train_tokenizer", lambda texts, *a, **k: tokenizer_calls.append(type(texts)) or
                        real_train(texts, *a, **k))
    out = tmp_path / "out"
    stats = main(CorpusConfig(out=str(out), inputs=[str(inp)], vocab_size=400, block_size=64, num_workers=2))
    assert tokenizer_calls and tokenizer_calls[0] is not list      # trained from a stream, not a list in memory
    assert stats["duplicates_removed"]["exact"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "documents.jsonl", "stats.json", "tokenizer",
                                                     "train", "validation"]          # no temporary files left
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    docs = docs_of(out)
    order = np.random.default_rng(0).permutation(len(docs))
    for split in ("train", "validation"):
        members = [docs[i]["text"] for i in order if docs[i]["split"] == split]
        flat = [t for text in members for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        ds = datasets.load_from_disk(str(out / split))
        shards = sorted(p.name for p in (out / split).glob("data-*.arrow"))
        assert sorted(Path(f["filename"]).name for f in ds.cache_files) == shards   # memory-mapped, not loaded
        blocks = np.array(ds["input_ids"], dtype=np.int64)
        n = len(flat) // 64
        assert blocks.shape == (n, 64) and blocks.ravel().tolist() == flat[:n * 64]
        assert stats["splits"][split]["tokens"] == len(flat)
        assert stats["splits"][split]["shards"] == len(shards) == -(-n // 7)
    assert stats["splits"]["train"]["shards"] > 2


def test_binary_junk_and_a_broken_pdf_are_named_and_counted_by_worker_processes(tmp_path, capsys):
    inp = small_corpus(tmp_path)
    (inp / "junk.txt").write_bytes(random.Random(1).randbytes(20000))
    (inp / "junk.md").write_bytes(b"\x00\x01\xfe" * 3000)
    (inp / "broken.pdf").write_bytes(make_pdf(paper_pages())[:700])
    stats = main(CorpusConfig(out=str(tmp_path / "out"), inputs=[str(inp)], vocab_size=300, block_size=64,
                              num_workers=2))
    log = capsys.readouterr().out
    assert f"skip {inp / 'junk.txt'}: non_utf8" in log and f"skip {inp / 'broken.pdf'}: unreadable_pdf" in log
    assert stats["skipped"]["non_utf8"] == 1 + (f"skip {inp / 'junk.md'}: non_utf8" in log)
    assert stats["documents_kept"] == 3 + (f"skip {inp / 'junk.md'}" not in log)


MEMORY_PROBE = """
import resource, sys
import data_prep.build_corpus as bc
bc.BATCH_CHARS, bc.FLUSH_TOKENS = 1 << 17, 1 << 16       # fixed buffers that both corpora fill
bc.main(bc.CorpusConfig(out=sys.argv[1], inputs=[sys.argv[2]], tokenizer=sys.argv[3], block_size=256))
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow  # builds two corpora to compare peak memory: ~25 s
def test_peak_memory_does_not_grow_with_the_corpus(default_run, tmp_path):
    """2 MB and 20 MB of varied text, one process each. Holding the corpus, as the in-memory build did, costs at
    least its text (1 byte a character) plus 4 bytes per token id (~2.3 characters a token here): > 50 MB more for
    the larger one. Streaming keeps the difference under the text size alone: its buffers are fixed (shrunk here so
    that the 2 MB corpus fills them too) and what grows per document is ~100 bytes (digest, offset, length)."""
    peaks = {}
    for mb in (2, 20):
        inp = tmp_path / f"in{mb}"
        inp.mkdir()
        total, i = 0, 0
        while total < mb * 10**6:
            total += (inp / f"{i}.txt").write_text(words(20000, 1000 * mb + i))
            i += 1
        r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / f"out{mb}"), str(inp),
                            str(default_run[0] / "tokenizer")], capture_output=True, text=True, cwd=REPO,
                           timeout=3600)     # a hang guard: ~25 s on an idle machine, > 10 min on a starved one
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[mb] = int(r.stdout.split("maxrss_kib")[-1]) / 1024
    assert peaks[20] - peaks[2] < 15, peaks
