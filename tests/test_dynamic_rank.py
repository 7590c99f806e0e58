"""Dynamic (nested, DyLoRA / sLAVA DyA) LoRA rank: what one adapter trained with lora_dynamic_rank gives when it is cut
to a smaller rank, the per-step rank draw through the training loop, truncation for evaluation and export, and the
refusals of ranks an adapter was not trained at."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import REPO, TINY_LLAMA, reset_accelerate
from test_sft import args_for as sft_args
from test_sft import run_in_process as run_sft
from test_sft import sft_inputs  # noqa: F401  (fixture)
from test_train_moe import vlm_inputs  # noqa: F401  (fixture)

from semivlm.config import load_config
from semivlm.model import DynamicRank, apply_lora, enable_dynamic_rank, merge_adapter, truncate_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, R = 32, 8
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def markov_tokens(n: int, seq: int, seed: int) -> torch.Tensor:
    """Sequences of a fixed random bigram chain (3 likely successors per token): a task whose held-out loss a rank-8
    LoRA on a frozen random decoder lowers, and keeps lowering with more rank."""
    g = torch.Generator().manual_seed(123)
    logits = torch.full((VOCAB, VOCAB), -4.0)
    for t in range(VOCAB):
        logits[t, torch.randperm(VOCAB, generator=g)[:3]] = torch.tensor([3.0, 2.0, 1.0])
    probs, g = logits.softmax(-1), torch.Generator().manual_seed(seed)
    x = torch.zeros(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, seq):
        x[:, i] = torch.multinomial(probs[x[:, i - 1]], 1, generator=g).squeeze(1)
    return x


def tiny_decoder(**overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    spec = {**TINY_LLAMA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": VOCAB,
            **overrides}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))


def train_adapter(base, dynamic: bool, steps: int = 200, lr: float = 5e-2, batch: int = 8, seed: int = 1):
    """LoRA r 8 on `base` (a copy), AdamW, the same data and initialisation whether dynamic or not."""
    torch.manual_seed(seed)
    model, _ = apply_lora(copy.deepcopy(base), R, 2 * R, 0.0, TARGETS)
    dynamic_rank = enable_dynamic_rank(model, 1, seed) if dynamic else None
    data = markov_tokens(steps * batch, 16, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        if dynamic_rank:
            dynamic_rank.set_step(step)
        ids = data[step * batch:(step + 1) * batch]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@torch.no_grad()
def held_out_loss(base, model, rank: int, tmp_path) -> float:
    """Held-out loss of the saved adapter merged at `rank` (the path evaluate.py and export_gptq.py take)."""
    ids = markov_tokens(64, 16, seed=2)
    where = tmp_path / f"adapter_{id(model)}"
    model.save_pretrained(where)
    merged = merge_adapter(copy.deepcopy(base), where, rank if rank < R else 0)
    return float(merged(input_ids=ids, labels=ids).loss)


@pytest.mark.slow  # 2 × 200 steps of a tiny decoder: 8 s on an idle core, 200 s on the shared machine at load 16
def test_truncating_a_dynamic_rank_adapter_to_half_rank_loses_less_held_out_loss_than_a_fixed_rank_one(tmp_path):
    base = tiny_decoder()
    losses = {}
    for dynamic in (False, True):
        model = train_adapter(base, dynamic)
        losses[dynamic] = {rank: held_out_loss(base, model, rank, tmp_path) for rank in (R, R // 2)}
    fixed, dyn = losses[False], losses[True]
    untrained = held_out_loss(base, apply_lora(copy.deepcopy(base), R, 2 * R, 0.0, TARGETS)[0], R, tmp_path)
    print(f"held-out loss, untrained {untrained:.4f} | fixed rank: r {fixed[R]:.4f}, r/2 {fixed[R // 2]:.4f} "
          f"(+{100 * (fixed[R // 2] / fixed[R] - 1):.2f}%) | dynamic: r {dyn[R]:.4f}, r/2 {dyn[R // 2]:.4f} "
          f"(+{100 * (dyn[R // 2] / dyn[R] - 1):.2f}%)")
    assert fixed[R] < untrained - 0.2 and dyn[R] < untrained - 0.2  # both learned the task
    # measured (seeds 1-3): cutting to r/2 costs the fixed-rank adapter 0.20-0.25 nats, the dynamic one 0.03-0.08
    assert dyn[R // 2] - dyn[R] < 0.5 * (fixed[R // 2] - fixed[R])
    assert dyn[R // 2] < fixed[R // 2]  # and the dynamic adapter at r/2 is the better rank-4 model outright


@pytest.mark.parametrize("family", ["llama", "mixtral", "mixtral_unfused"])
def test_a_truncated_adapter_gives_the_logits_training_computed_at_that_rank(family, tmp_path):
    """Training forward at r' (masks) == the saved adapter cut to r' and merged: Linear LoRA, fused-expert LoRA (PEFT
    ParamWrapper, target_parameters) and LoRA on experts unfused into per-expert Linears (moe.unfuse_experts)."""
    from peft import get_peft_model

    from semivlm import moe

    if family == "llama":
        base = tiny_decoder()
        model = apply_lora(copy.deepcopy(base), R, 2 * R, 0.0, TARGETS)[0]
    elif family == "mixtral":
        base = tiny_decoder(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
        model = get_peft_model(copy.deepcopy(base), moe.expert_lora_config(base, R, 2 * R))
    else:
        base = tiny_decoder(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
        moe.unfuse_experts(base)
        model = get_peft_model(copy.deepcopy(base), moe.unfused_expert_lora_config(R, 2 * R, 0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as if trained: B starts at zero, which would hide every rank
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(len(name)))
    dynamic_rank = enable_dynamic_rank(model, 2, seed=0)
    ids = markov_tokens(2, 12, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    model.train()
    with torch.no_grad():
        for rank in (2, 5, R):
            dynamic_rank.set_rank(rank)
            trained_at = model(input_ids=ids).logits
            merged = merge_adapter(copy.deepcopy(base), tmp_path / "adapter", rank)
            torch.testing.assert_close(merged(input_ids=ids).logits, trained_at, rtol=1e-5, atol=1e-5)
        model.eval()  # outside training the adapter runs at full rank whatever the step drew ...
        dynamic_rank.set_rank(2)
        torch.testing.assert_close(model(input_ids=ids).logits, merge_adapter(copy.deepcopy(base), tmp_path / "adapter")(
            input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        dynamic_rank.set_eval_rank(4)  # ... unless an evaluation rank is set
        torch.testing.assert_close(model(input_ids=ids).logits, merge_adapter(copy.deepcopy(base), tmp_path / "adapter",
                                                                              4)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
        dynamic_rank.set_eval_rank(None)
    # only the leading r' components get gradients: lora_A rows and lora_B columns beyond r' stay at zero
    model.train()
    dynamic_rank.set_rank(3)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            grad = p.grad.reshape(-1, R, p.shape[1])  # (experts, rank, in), experts 1 for Linear
            assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0, name
        elif "lora_B" in name:
            grad = p.grad.reshape(p.shape[0], R, -1)  # (out, rank, experts)
            assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0, name


def test_the_sub_rank_depends_only_on_seed_and_step():
    one = DynamicRank(apply_lora(tiny_decoder(), R, 16, 0.0, ["q_proj"])[0], 2, seed=7)
    other = DynamicRank(apply_lora(tiny_decoder(num_hidden_layers=2), R, 16, 0.0, TARGETS)[0], 2, seed=7)
    draws = [one.draw(s) for s in range(200)]
    assert draws == [other.draw(s) for s in range(200)]  # another model, same (seed, step): same rank
    assert set(draws) == set(range(2, R + 1))  # every rank of [rank_min, r] is trained
    reseeded = DynamicRank(apply_lora(tiny_decoder(), R, 16, 0.0, ["q_proj"])[0], 2, seed=8)
    assert draws != [reseeded.draw(s) for s in range(200)]


def test_ranks_outside_rank_min_to_r_are_refused_in_one_line(tmp_path):
    model = apply_lora(tiny_decoder(), R, 16, 0.0, ["q_proj"])[0]
    with pytest.raises(SystemExit, match=r"^lora_rank_min 9 is outside \[1, 8\] \(the adapters' rank\)$"):
        DynamicRank(model, 9, seed=0)
    with pytest.raises(SystemExit, match=r"^lora_rank_min 0 is outside"):
        DynamicRank(model, 0, seed=0)
    dynamic_rank = DynamicRank(model, 3, seed=0)
    with pytest.raises(SystemExit, match=r"^rank 2 is outside \[3, 8\], the ranks this adapter was trained at$"):
        dynamic_rank.set_rank(2)
    # a saved adapter of a lora_dynamic_rank run: its run_config.json beside it names the smallest rank trained
    model.save_pretrained(tmp_path / "run/adapter")
    (tmp_path / "run/run_config.json").write_text(json.dumps({"lora_dynamic_rank": True, "lora_rank_min": 3}))
    for rank in (2, 9, 0):
        with pytest.raises(SystemExit, match=rf"^rank {rank} is outside \[3, 8\]"):
            truncate_adapter(tmp_path / "run/adapter", rank, tmp_path / "cut")
    assert not (tmp_path / "cut").exists()
    truncate_adapter(tmp_path / "run/adapter", 3, tmp_path / "cut")
    assert json.loads((tmp_path / "cut/adapter_config.json").read_text())["r"] == 3


def test_dynamic_rank_without_lora_or_on_a_stage_without_it_is_refused():
    from train_moe import MoEConfig, check_stage_fields

    with pytest.raises(SystemExit, match=r"--stage projector does not read lora_dynamic_rank \(read by the llm and moe"):
        check_stage_fields(MoEConfig(stage="projector", lora_dynamic_rank=True))
    with pytest.raises(SystemExit, match=r"no LoRA adapters"):
        DynamicRank(tiny_decoder(), 1, seed=0)


def pretrain_ranks(tiny_blocks, out, monkeypatch, **overrides) -> list[tuple[int, int]]:
    """Run train_pretrain.py with dynamic rank; return (step, rank seen) for every training forward: the number of
    lora_A output components that are not masked out, read by a hook on one adapter."""
    import train_pretrain
    from semivlm import model as model_lib

    seen, step = [], {"now": -1}
    real_enable = model_lib.enable_dynamic_rank

    def enable(model, rank_min, seed):
        dynamic_rank = real_enable(model, rank_min, seed)
        set_step = dynamic_rank.set_step
        dynamic_rank.set_step = lambda s: (step.update(now=s), set_step(s))[-1]
        lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        lora_a.register_forward_hook(lambda m, args, out: seen.append(
            (step["now"], int((out.detach().abs().amax(dim=(0, 1)) > 0).sum()))) if m.training else None)
        return dynamic_rank

    monkeypatch.setattr(train_pretrain, "enable_dynamic_rank", enable)
    values = {"output_dir": out, "model_config": json.dumps(TINY_LLAMA), "tokenizer": tiny_blocks / "tokenizer",
              "train_data": tiny_blocks / "train", "micro_batch_size": 2, "grad_accum": 3, "max_steps": 5,
              "warmup_steps": 1, "learning_rate": 1e-2, "eval_every": 0, "save_every": 0, "lora_r": R,
              "lora_alpha": 16, "lora_dynamic_rank": "true", "lora_rank_min": 2, "seed": 5, "peak_tflops": 1.0,
              "ds_config": REPO / "ds_configs/zero3_fp32.json", **overrides}
    reset_accelerate()
    result = train_pretrain.main(load_config(train_pretrain.PretrainConfig,
                                             [x for k, v in values.items() for x in (f"--{k}", str(v))]))
    return seen, result


def test_every_micro_batch_of_a_step_trains_the_rank_drawn_for_that_step(tiny_blocks, tmp_path, monkeypatch):
    seen, _ = pretrain_ranks(tiny_blocks, tmp_path / "whole", monkeypatch)
    by_step: dict[int, set] = {}
    for step, rank in seen:
        by_step.setdefault(step, set()).add(rank)
    assert sorted(by_step) == list(range(5)) and len(seen) == 5 * 3  # 3 micro-batches per step
    reference = DynamicRank(apply_lora(tiny_decoder(), R, 16, 0.0, ["q_proj"])[0], 2, seed=5)
    assert by_step == {s: {reference.draw(s)} for s in range(5)}
    assert len({r for ranks in by_step.values() for r in ranks}) > 1  # it does vary between steps


@pytest.mark.slow
def test_a_resumed_dynamic_rank_run_trains_the_same_ranks_and_losses(tiny_blocks, tmp_path, monkeypatch):
    seen, result = pretrain_ranks(tiny_blocks, tmp_path / "whole", monkeypatch)
    # stopped after 2 steps and resumed: the same ranks at the same steps, and the same losses
    first, _ = pretrain_ranks(tiny_blocks, tmp_path / "resumed", monkeypatch, exit_after_steps=2)
    rest, resumed = pretrain_ranks(tiny_blocks, tmp_path / "resumed", monkeypatch)
    assert first + rest == seen
    losses = lambda r: [h["loss"] for h in r["history"] if "loss" in h]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(result), rel=1e-5)


@pytest.mark.slow
def test_sft_with_dynamic_rank_exports_an_adapter_that_evaluate_sweeps_one_row_per_rank(sft_inputs,  # noqa: F811
                                                                                     tmp_path):
    from evaluate import EvalConfig
    from evaluate import main as evaluate

    out = tmp_path / "sft"
    result = run_sft(sft_args(sft_inputs, out, lora_r=R, lora_alpha=16, lora_dynamic_rank="true", lora_rank_min=2,
                              max_steps=4, learning_rate=1e-2))
    assert result["final_dir"] and (out / "adapter/adapter_config.json").is_file()
    data = [str(sft_inputs / "instr/instructions.jsonl")]
    common = dict(data=data, split="", limit=6, batch_size=3)
    with pytest.raises(SystemExit, match=r"^ranks: rank 1 is outside \[2, 8\]"):  # before evaluating any rank
        evaluate(EvalConfig(model=str(out / "adapter"), output_dir=str(tmp_path / "bad"), ranks=[8, 1], **common))
    assert not (tmp_path / "bad/rank_8").exists()
    sweep = evaluate(EvalConfig(model=str(out / "adapter"), output_dir=str(tmp_path / "sweep"), ranks=[8, 4, 2],
                                **common))
    rows = json.loads((tmp_path / "sweep/ranks.json").read_text())["rows"]
    assert [r["rank"] for r in rows] == [8, 4, 2] == [r["rank"] for r in sweep["rows"]]
    assert all(r["perplexity"] > 1 for r in rows) and len({r["perplexity"] for r in rows}) == 3
    report = (tmp_path / "sweep/report.md").read_text()
    assert sum(line.startswith("| 8 ") or line.startswith("| 4 ") or line.startswith("| 2 ")
               for line in report.splitlines()) == 3
    # rank 8 of the adapter is the run's merged final/
    merged = evaluate(EvalConfig(model=str(out / "final"), output_dir=str(tmp_path / "final"), **common))
    assert rows[0]["perplexity"] == pytest.approx(merged["headline"]["perplexity"], rel=1e-4)


@pytest.mark.slow
def test_train_moe_llm_stage_with_dynamic_rank_exports_an_adapter_that_serves_each_rank(vlm_inputs,  # noqa: F811
                                                                                        tmp_path):
    from test_train_moe import args_for as moe_args
    from test_train_moe import run_stage

    from semivlm import evaluation as ev
    from semivlm.model import adapter_base

    run_stage(moe_args(vlm_inputs, tmp_path / "projector", "projector", vlm_inputs / "llm", max_steps=1,
                       classify_eval=0))
    out = tmp_path / "llm"
    result = run_stage(moe_args(vlm_inputs, out, "llm", tmp_path / "projector/final", lora_r=4, lora_dropout=0.0,
                                lora_dynamic_rank="true", lora_rank_min=2, max_steps=3, classify_eval=0))
    assert result["final_dir"] and json.loads((out / "adapter/adapter_config.json").read_text())["r"] == 4
    assert adapter_base(out / "adapter") == str(tmp_path / "projector/final")
    logits = {}
    for rank in (4, 2):
        base, processor, _ = ev.load_model(adapter_base(out / "adapter"))
        model = merge_adapter(base, out / "adapter", rank)
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        with torch.no_grad():
            logits[rank] = model(input_ids=ids).logits
    final, _, _ = ev.load_model(str(out / "final"))
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, logits[4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[2], logits[4])  # rank 2 is another (trained) model
