"""`pretrain export` and `pretrain run --init-from`: every recipe's model as a transformers model, proven by equal
logits on a real padded batch of the built-in corpus, equal tokenizer ids, equal greedy generations, and an
exact round trip; plus the refusals.

Speed: the tiny recipes train 2 steps; the full-size recipes keep every structural switch (norms, placement,
positions, activation, biases, embedding norm, tying, output rescale, eps, head size 64) but are shrunk to 2
layers of width 128 (`SHRINK`) and built from their init plus 2 steps; `test_gpt2_full_size` keeps one
real-size (124M) check. Vocabularies are 2000 pieces (one unigram and one BPE tokenizer for the module).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from objectives.base import make_generator
from pretrain import run as runs
from pretrain.cli import app
from pretrain.config import resolve
from pretrain.data import prepare
from pretrain.export import export, load_hf, max_abs_diff
from pretrain.hf_config import family
from pretrain.tokenizer import Tokenizer
from pretrain.trainer import Start, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.max_steps=2", "train.batch_size=4", "train.grad_accum=1", "train.eval_every=0", "train.eval_batches=1",
        "train.num_workers=0", "train.precision=fp32", "train.ckpt_every=0", "data.vocab_size=2000"]
SHRINK = ["model.n_layers=2", "model.d_model=128", "model.n_heads=2", "model.d_ff=256", "data.seq_len=64"]
RECIPES = {  # name -> extra --set items
    "gpt2-tiny": [], "bert-tiny": [], "roberta-tiny": [], "t5-tiny": [], "bart-tiny": [],
    "gpt2": SHRINK, "bert": SHRINK, "roberta": SHRINK, "t5": [*SHRINK, "model.n_dec_layers=2"],
    "bart": [*SHRINK, "model.n_dec_layers=2"],
    # no recipe is a Llama; the switches that make one, on the tiny decoder, untied to cover a separate lm_head
    "llama": ["model.positions=rope", "model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false",
              "model.tie_embeddings=false"],
}
HOSTILE = ("Café naïve résumé ½ ﬁ — “quotes”\ttab, 東京は日本の首都です。한국어 😀👍🏽🇫🇷\nline two\n\n    indented\r\n"
           "the literal texts [MASK] and <pad> and <s></s>[CLS] <extra_id_0> <unk> <0x41> stay text ▁ end  ")
runner = CliRunner()


def sets(*items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


def trained(work: Path, name: str) -> Path:
    """A run of recipe `name` (2 steps), made once per module."""
    run_dir = work / "runs" / name
    if not run_dir.exists():
        recipe = "gpt2-tiny" if name == "llama" else name
        cfg, src = resolve(recipe=recipe, sets=[*FAST, *RECIPES[name], f"data.cache_dir={work / 'cache'}"])
        train(cfg, run_dir, Start(sources=src), console=Console(quiet=True))
    return run_dir


def padded(batch: dict, pad: int) -> dict:
    """The batch with right padding on every side it has: row r loses its last r * T // 8 tokens (kept as is
    where the objective padded already)."""
    out = dict(batch)
    sides = [("input_ids", "attention_mask")]
    if "decoder_input_ids" in batch:
        sides.append(("decoder_input_ids", "decoder_attention_mask"))
    for ids, mask in sides:
        B, T = batch[ids].shape
        keep = torch.arange(T)[None, :] < (T - torch.arange(B)[:, None] * (T // 8))  # (B, T)
        m = batch.get(mask, torch.ones(B, T, dtype=torch.long)) * keep
        out[ids], out[mask] = batch[ids].masked_fill(m == 0, pad), m
    return out


@pytest.mark.parametrize("name", list(RECIPES))
def test_exported_model_gives_our_logits(work, name):
    run_dir = trained(work, name)
    out = work / "hf" / name
    card = export(run_dir, out)
    loaded = runs.load(run_dir, "cpu")
    cfg, vocab = loaded.cfg, loaded.tokenizer.vocab
    fam = family(cfg.model, cfg.objective.arch)
    assert card["family"] == fam.hf_class and (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert ("generation_config.json" in os.listdir(out)) == (cfg.objective.arch.kind != "encoder")
    hf = load_hf(out, fam.auto_class)
    assert type(hf).__name__ == fam.hf_class
    data = dataclasses.replace(cfg.data, tokenizer=str(runs.RunDir(run_dir).tokenizer))
    split = prepare(data, extra_pieces=cfg.objective.special_pieces, progress=False).cache.split("valid")
    batch = padded(cfg.objective.batch(split, vocab, make_generator(0, "export"), 4, cfg.data.seq_len), vocab.pad)
    for mask in ("attention_mask", "decoder_attention_mask"):  # padding on every side the model has
        assert mask not in batch or (batch[mask] == 0).any()
    diff = max_abs_diff(loaded.model, hf, batch)
    print(f"{name}: {fam.hf_class} max abs diff {diff}")
    expected = {"logits"} | ({"nsp_logits"} if cfg.objective.arch.classifier else set()) | (
        {"encoder"} if cfg.objective.arch.kind == "encoder-decoder" else set())
    assert set(diff) == expected and max(diff.values()) <= 1e-4, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(HOSTILE, add_special_tokens=False)["input_ids"] == loaded.tokenizer.encode(HOSTILE)
    f = cfg.objective.framing(vocab)
    assert hf_tok("a text")["input_ids"] == [*f.prefix, *loaded.tokenizer.encode("a text"), *f.suffix]
    if cfg.objective.arch.kind != "encoder":
        assert_same_greedy(run_dir, hf, hf_tok)
    assert_round_trip(out, cfg)


def assert_same_greedy(run_dir: Path, hf, hf_tok) -> None:
    """`pretrain generate` greedy and transformers' `generate` greedy write the same tokens."""
    from pretrain.generate import DecodeOptions, framed, generate_batch, load_run

    r = load_run(run_dir, "cpu")
    prompt = "The function returns"
    # 12 tokens, `</s>` barred (a 2-step model ends at once otherwise), so there are tokens to compare
    ours = generate_batch(r, [prompt], DecodeOptions(max_new_tokens=12, min_new_tokens=12))[0]
    ids = torch.tensor([framed(r, ours.input_ids)])
    assert ids.tolist()[0] == hf_tok(prompt)["input_ids"]  # the HF tokenizer frames as `pretrain generate` does
    with torch.no_grad():
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, num_beams=1)
    new = gen[0, ids.size(1):] if r.kind == "decoder" else gen[0, 1:]  # past the prompt / the decoder start
    assert new.tolist() == ours.output_ids and len(ours.output_ids) == 12


def assert_round_trip(out: Path, cfg) -> None:
    """export -> the --init-from path (config and weights read back into our backbone) -> export: same bytes."""
    from pretrain import hf_map
    from pretrain.export import layout
    from pretrain.hf_import import init_config, load_into

    new, _ = init_config(str(out), cfg, [], explicit=False)
    assert new.model == cfg.model
    model = runs.build_model(new, Tokenizer.load(new.data.tokenizer).size)
    load_into(model, str(out), new)
    again = hf_map.to_hf(layout(family(new.model, new.objective.arch), new, model.embed.weight.size(0)),
                         model.state_dict())
    saved = load_file(str(out / "model.safetensors"))
    assert set(again) == set(saved)
    for k, v in saved.items():
        assert v.dtype == again[k].dtype and v.shape == again[k].shape, k
        assert v.numpy().tobytes() == again[k].numpy().tobytes(), k


def test_tokenizer_ids_on_the_whole_corpus(work):
    """BPE: every docstring of the built-in corpus gets our ids. Unigram: all but sentencepiece's float32
    tie-breaks between equal-score orders of the same whitespace pieces ("▁▁▁▁" "▁" vs "▁" "▁▁▁▁"), which
    decode to the same text."""
    from objectives.base import Framing
    from pretrain.corpus import stdlib_documents
    from pretrain.hf_tokenizer import hf_tokenizer

    docs = list(stdlib_documents())[::4]
    for name in ("gpt2", "bert-tiny"):  # a BPE and a unigram tokenizer
        tok = Tokenizer.load(runs.RunDir(trained(work, name)).tokenizer)
        hf = hf_tokenizer(tok, Framing(), False, 10**6)
        ours, theirs = tok.encode_batch(docs), hf(docs, add_special_tokens=False)["input_ids"]
        differ = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
        for a, b in differ:  # the same pieces, reordered only where they are runs of "▁"
            assert len(a) == len(b) and sorted(a) == sorted(b) and tok.decode(a) == tok.decode(b)
            assert all(set(tok.id_to_piece(x)) == {"▁"} for x, y in zip(a, b, strict=True) if x != y)
        assert len(differ) <= (0 if name == "gpt2" else len(docs) // 200), len(differ)


def test_gpt2_full_size(work):
    """The real 124M GPT-2 (12 x 768, context 1024), built at init and exported: the Conv1D transposes at scale."""
    cfg, src = resolve(recipe="gpt2", sets=[*FAST, "train.max_steps=1", "train.batch_size=1", "data.seq_len=32",
                                            f"data.cache_dir={work / 'cache'}"])
    run_dir = work / "runs" / "gpt2-full"
    train(cfg, run_dir, Start(sources=src), console=Console(quiet=True))
    card = export(run_dir, work / "hf" / "gpt2-full")
    print(f"gpt2 full size ({card['parameters']:,} parameters): max abs diff {card['max_abs_diff']}")
    assert card["parameters"] > 85_000_000 and max(card["max_abs_diff"].values()) <= 1e-4


# ------------------------------------------------------------------------------------------------ the CLI
def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def one_line_error(code: int, output: str, *words: str) -> None:
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    for w in words:
        assert w in output, (w, output)


def test_cli_round_trip_through_init_from(work):
    """export -> `run --init-from` (one step at lr 1e-30: the weights cannot move) -> export: identical bytes."""
    src = trained(work, "t5-tiny")
    first, second = work / "cli" / "first", work / "cli" / "second"
    code, out = cli("export", src, "--out", first)
    assert code == 0 and "T5ForConditionalGeneration" in out, out
    run_dir = work / "cli" / "init-run"
    code, out = cli("run", "--objective", "span", "--init-from", first, "--out", run_dir,
                    *sets(*FAST, "train.max_steps=1", "train.lr=1e-30", f"data.cache_dir={work / 'cache'}"))
    assert code == 0, out
    saved = runs.load_config(run_dir)
    assert saved.model == runs.load_config(src).model and saved.data.tokenizer.endswith("tokenizer.model")
    code, out = cli("export", run_dir, "--out", second, "--step", "1")
    assert code == 0, out
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert set(a) == set(b) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_refusals_are_one_line_errors_and_write_nothing(work, tmp_path):
    run_dir = trained(work, "gpt2-tiny")
    # --out exists and is not empty
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    one_line_error(*cli("export", run_dir, "--out", tmp_path / "full"), "not empty", "--force")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    # a run without a checkpoint, and a step that was not saved
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("checkpoints"))
    one_line_error(*cli("export", bare, "--out", tmp_path / "x"), "no checkpoint")
    one_line_error(*cli("export", run_dir, "--out", tmp_path / "x", "--step", "7"), "step 7", "steps saved: 2")
    # switches no HF class represents: pre-LN BERT, sinusoidal positions
    for objective, switch, word in (("mlm", "model.norm_placement=pre", "norm_placement"),
                                    ("clm", "model.positions=sinusoidal", "positions")):
        cfg, src = resolve(objective=objective, sets=[*FAST, *SHRINK, "train.max_steps=1", switch,
                                                      f"data.cache_dir={work / 'cache'}"])
        bad = tmp_path / f"bad-{objective}"
        train(cfg, bad, Start(sources=src), console=Console(quiet=True))
        one_line_error(*cli("export", bad, "--out", tmp_path / "x"), word, "--set model.")
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_init_from_refusals(work, tmp_path):
    gpt2 = work / "hf" / "gpt2-tiny"
    if not gpt2.exists():
        export(trained(work, "gpt2-tiny"), gpt2)
    base = ["run", "--out", tmp_path / "run", *sets(*FAST, f"data.cache_dir={work / 'cache'}")]
    one_line_error(*cli(*base, "--objective", "clm", "--init-from", tmp_path), "not a Hugging Face model folder")
    one_line_error(*cli(*base, "--objective", "mlm", "--init-from", gpt2), "GPT2LMHeadModel", "needs encoder")
    one_line_error(*cli(*base, "--objective", "clm", "--init-from", gpt2, *sets("model.n_layers=3")),
                   "model.n_layers = 3", "drop model.n_layers")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(gpt2 / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    one_line_error(*cli(*base, "--objective", "clm", "--init-from", pickled), "pickle", "safetensors")
    assert not (tmp_path / "run").exists()


def test_export_without_transformers_says_what_to_install(monkeypatch):
    from pretrain.errors import UserError
    from pretrain.export import require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"pip install 'pretrain\[hf\]'"):
        require_transformers()


def test_help_does_not_import_transformers():
    code = "import sys, pretrain.cli; print([m for m in ('transformers', 'tokenizers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    assert "export" in runner.invoke(app, ["--help"]).output
