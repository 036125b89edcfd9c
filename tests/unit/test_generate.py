"""Generation from a tiny causal run trained here (python -m train.generate).

python -m pytest -q tests/unit/test_generate.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.transformer import Transformer
from train.config import load_config
from train.export import export
from train.generate import SamplingArgs, generate, load_generator, main
from train.loop import train

TINY = [
    "model.vocab_size=512",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "attention.block_size=16",
    "attention.window_blocks=3",
    "attention.global_blocks=1",
    "attention.random_blocks=2",
    "train.seq_len=128",
    "train.micro_batch_size=4",
    "train.eval_batches=1",
    "optim.lr=5e-3",
    "schedule.warmup_steps=2",
    "schedule.min_lr=1e-3",
    "logging.progress_bar=false",
    "logging.wandb_mode=disabled",
    "logging.peak_tflops=1",
    "logging.pattern_picture=false",
]
PROMPT = "def main():\n    "
LONG_PROMPT = (
    'def main(argv=None):\n    """Parse the arguments and run."""\n'
    "    parser = argparse.ArgumentParser()\n    "
)


def _train(data_dir: Path, run_dir: Path, *overrides: str) -> Path:
    settings = [*TINY, f"data.path={data_dir}", f"train.run_dir={run_dir}", *overrides]
    train(load_config(None, settings))
    return run_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Generation runs many tiny forwards: on a loaded machine a second intra-op thread only
    waits for its turn (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def causal_run(tiny_prepared_data, tmp_path_factory) -> Path:
    """A causal run of 6 steps (a random block reaches back beyond the window at 128 tokens)."""
    return _train(tiny_prepared_data, tmp_path_factory.mktemp("gen") / "run", "train.steps=6")


@pytest.fixture(scope="module")
def gen(causal_run):
    return load_generator(causal_run)


def test_greedy_is_deterministic_and_equals_argmax_by_hand(gen, causal_run, tmp_path):
    prompt = gen.prompt_ids(LONG_PROMPT)
    assert prompt[0] == gen.tokenizer.eos_id  # a document starts after an end-of-document
    greedy = SamplingArgs(max_tokens=40, temperature=0, stop_at_eos=False)
    vocab = gen.tokenizer.vocab_size
    ids = generate(gen.model, prompt, greedy, vocab, gen.tokenizer.eos_id)
    assert len(ids) == 40
    assert generate(gen.model, prompt, greedy, vocab, gen.tokenizer.eos_id) == ids
    # By hand, from the exported state dict: argmax of the last position, whole prefix each time.
    cfg = gen.cfg
    model = Transformer(cfg.model, cfg.attention)
    model.load_state_dict(torch.load(export(causal_run, tmp_path / "model.pt")))
    model.eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            logits = model(torch.tensor([tokens]), step=0)[0, -1, :vocab]
            tokens.append(int(logits.argmax()))
    assert tokens[len(prompt) :] == ids
    # Long enough for random blocks: block 5 has its window at 3-5, the global block 0 and
    # draws from blocks 1-2.
    assert len(tokens) > 5 * 16


def test_top_k_1_is_greedy_and_a_seed_repeats(gen):
    prompt, vocab, eos = gen.prompt_ids(PROMPT), gen.tokenizer.vocab_size, gen.tokenizer.eos_id
    greedy = generate(gen.model, prompt, SamplingArgs(20, 0, stop_at_eos=False), vocab, eos)
    top1 = SamplingArgs(20, temperature=1.5, top_k=1, seed=3, stop_at_eos=False)
    assert generate(gen.model, prompt, top1, vocab, eos) == greedy
    sampled = [
        generate(gen.model, prompt, SamplingArgs(20, 1.0, 0, seed, False), vocab, eos)
        for seed in (0, 0, 1)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]  # 20 draws of a barely trained model: seeds differ
    assert all(len(s) == 20 and max(s) < vocab for s in sampled)


def test_a_prefix_keeps_its_logits_as_the_text_grows(gen):
    """The whole-sequence random draw of a causal pattern depends only on the query block, so
    recomputing the prefix gives each earlier token the logits it had (crossing block edges)."""
    tokens = torch.tensor([gen.prompt_ids(PROMPT * 12)])
    assert tokens.shape[1] > 5 * 16
    with torch.no_grad():
        whole = gen.model(tokens, step=0)
        for n in (17, 50, 65):
            torch.testing.assert_close(gen.model(tokens[:, :n], step=0), whole[:, :n])


def test_max_tokens_and_the_end_of_document(gen):
    prompt, vocab, eos = gen.prompt_ids(PROMPT), gen.tokenizer.vocab_size, gen.tokenizer.eos_id
    assert generate(gen.model, prompt, SamplingArgs(max_tokens=0), vocab, eos) == []
    for n in (1, 7):
        ids = generate(gen.model, prompt, SamplingArgs(n, 1.0, seed=5), vocab, eos)
        assert len(ids) <= n and eos not in ids
        assert len(generate(gen.model, prompt, SamplingArgs(n, 1.0, 0, 5, False), vocab)) == n
    # Generation ends at (and without) the end-of-document token: name a greedy token so.
    greedy = generate(gen.model, prompt, SamplingArgs(8, 0, stop_at_eos=False), vocab)
    cut = max(i for i, t in enumerate(greedy) if t not in greedy[:i])  # a first occurrence
    ended = generate(gen.model, prompt, SamplingArgs(8, 0), vocab, eos_id=greedy[cut])
    assert ended == greedy[:cut]
    with pytest.raises(ValueError, match="temperature"):
        SamplingArgs(temperature=-1)
    with pytest.raises(ValueError, match="top-k"):
        SamplingArgs(top_k=-2)


def test_cli_prints_the_prompt_and_its_continuation(causal_run, capsys):
    argv = ["--checkpoint", str(causal_run), "--prompt", PROMPT, "--max-tokens", "12"]
    assert main([*argv, "--temperature", "0", "--ignore-eos"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert main([*argv, "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out == text  # greedy: the same text again
    assert main([*argv, "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)
    assert main([*argv, "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_a_bidirectional_checkpoint_is_refused(tiny_mlm_data, tmp_path, capsys):
    run = _train(
        tiny_mlm_data, tmp_path / "mlm", "train.steps=1", "attention.causal=false",
        "data.objective=mlm",
    )  # fmt: skip
    with pytest.raises(ValueError, match="bidirectional .* cannot continue a text"):
        load_generator(run)
    assert main(["--checkpoint", str(run), "--prompt", "x = "]) == 2
    assert "bidirectional" in capsys.readouterr().err
