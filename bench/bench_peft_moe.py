"""Full experts vs LoRA experts vs QLoRA (nf4) vs dynamic-rank LoRA in a recipe's moe stage, at its shapes, in one run.

    python bench/bench_peft_moe.py --out runs/bench_peft_moe.json                       # debug recipe (runs/demo)
    python bench/bench_peft_moe.py --out runs/bench_peft_moe_smollm2.json \
        --recipe launch/configs/smollm2_cpu --run runs/demo-real                           # SmolLM2 (make demo-real)
    python bench/bench_peft_moe.py --out x.json --steps 60 --variants "[full,qlora]"

Each variant is `train_moe.main` with the recipe's moe.yaml (experts, top-k, micro-batch, max_length, task repeats,
steps, learning rate, ds_config), its paths moved under --run, started from RUN/llm/final (the recipe's llm stage must
have run: `launch/recipe.sh RECIPE RUN` or `make demo` / `make demo-real`). Each runs in its own child process, one
after the other, so that each peak RSS is its own.

Reported per variant:
- trainable parameters;
- weight, gradient and optimizer bytes, counted from the parameters as the run holds them after its set-up:
  weights = every parameter's storage (fp32 here; nf4 = 4-bit packed uint8 + the absmax/double-quantisation state,
  semivlm.moe.parameter_bytes), gradients = trainable elements × their element size, optimizer = AdamW's 2 fp32
  states per trainable element (8 bytes);
- peak RSS of the child process (ru_maxrss) when training and export are done, tokens/s (median over the steps after
  the first two), held-out loss at the last step, held-out class accuracy of the export (greedy answers matched);
- caption METEOR (and BLEU-4, ROUGE-L) of the export on --caption_eval held-out captions, by evaluate.py with the
  recipe's evaluate.yaml (pycocoevalcap; METEOR needs Java, else the row says which backend scored it);
- and the ratio QLoRA / full of weight + optimizer bytes (issue 20's target: <= 0.4).
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file (python bench/…): train_moe.py and semivlm/ live at the root

# name -> MoEConfig overrides. The seed's QLoRA setting (MoE-LLaVA for InfographicsVQA): r 8, alpha 16, dropout 0.05.
LORA = {"moe_lora_r": 8, "moe_lora_alpha": 16, "moe_lora_dropout": 0.05}
VARIANTS = {
    "full": {},
    "lora": LORA,
    "qlora": {**LORA, "quantization": "nf4"},
    # dynamic rank (issue 20 point 3): one adapter trained at r' ~ U[4, 8] per step; its held-out loss is measured at
    # r and, in the row "dynamic_rank r/2", at r/2 (model.DynamicRank.set_eval_rank, what evaluate.py's `rank` gives)
    "dynamic_rank": {**LORA, "lora_dynamic_rank": True, "lora_rank_min": 4},
}


def recipe_stage(recipe: str, run: str) -> dict:
    """The recipe's moe.yaml with every path under the recipe's own run directory moved under `run`."""
    import yaml

    path = REPO / recipe / "moe.yaml"
    if not path.is_file():
        raise SystemExit(f"--recipe {recipe}: no moe.yaml in it")
    values = yaml.safe_load(path.read_text())
    own = str(Path(values["output_dir"]).parent)  # e.g. runs/demo: where the recipe's YAMLs point

    def moved(p: str) -> str:
        return run + p[len(own):] if p.startswith(own + "/") else p

    values["init_from"] = f"{run}/llm/final"
    values["train_data"] = [moved(p) for p in values["train_data"]]
    return values


def child(args) -> None:
    """One variant: train_moe.main with the parameter counts taken right after the stage's set-up, then the caption
    metrics of its export."""
    import torch

    import evaluate
    import train_moe
    from semivlm import moe
    from semivlm.config import load_config

    counts = {}
    setup = train_moe.prepare_stage_model

    def counting(cfg, model, accelerator):
        out = setup(cfg, model, accelerator)
        trainable = [p for p in out[0].parameters() if p.requires_grad]
        counts.update(trainable_params=sum(p.numel() for p in trainable),
                      total_params=sum(p.numel() for p in out[0].parameters()),
                      weight_bytes=moe.parameter_bytes(out[0]),
                      grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
                      optimizer_bytes=8 * sum(p.numel() for p in trainable))  # AdamW: exp_avg, exp_avg_sq in fp32
        return out

    train_moe.prepare_stage_model = counting
    if VARIANTS[args.child].get("lora_dynamic_rank"):  # the trained adapter's held-out loss at r/2 as well
        from semivlm import loop

        def train_then_half_rank(cfg, accelerator, model, tokenizer, train_set, eval_set, collate, **kwargs):
            result = loop.train(cfg, accelerator, model, tokenizer, train_set, eval_set, collate, **kwargs)
            if eval_set is None:
                return result
            model.dynamic_rank.set_eval_rank(model.dynamic_rank.r // 2)
            counts["eval_loss_half_rank"] = loop.evaluate(model, accelerator, eval_set, collate, cfg,
                                                          kwargs["loss_fn"])["eval_loss"]
            model.dynamic_rank.set_eval_rank(None)
            return result

        train_moe.train = train_then_half_rank
    stage = recipe_stage(args.recipe, args.run)
    output_dir = Path(args.root) / args.child
    values = {"output_dir": output_dir, "init_from": stage["init_from"], "train_data": json.dumps(stage["train_data"]),
              "max_steps": args.steps or stage["max_steps"], "learning_rate": args.learning_rate or stage["learning_rate"],
              "eval_every": 0, "save_every": 0, "seed": 0, "index_dir": Path(args.root) / "record_index",
              "classify_eval": args.classify_eval or stage.get("classify_eval", 0), **VARIANTS[args.child]}
    if args.eval_batches:
        values["eval_batches"] = args.eval_batches
    argv = ["--config", str(REPO / args.recipe / "moe.yaml")]
    cfg = load_config(train_moe.MoEConfig, argv + [x for k, v in values.items() for x in (f"--{k}", str(v))])
    t0 = time.perf_counter()
    result = train_moe.main(cfg)
    train_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the caption evaluation adds its own
    steps = [h for h in result["history"] if "tokens_per_s" in h]
    evals = [h for h in result["history"] if "eval_loss" in h]
    captions = {}
    if args.caption_eval:
        captions_file = [p for p in stage["train_data"] if Path(p).name == "captions.jsonl"]
        ecfg = load_config(evaluate.EvalConfig, [
            "--config", str(REPO / args.recipe / "evaluate.yaml"), "--model", str(output_dir / "final"),
            "--data", json.dumps(captions_file), "--output_dir", str(output_dir / "eval_captions"),
            "--limit", str(args.caption_eval), "--goals", "{}"])
        headline = evaluate.main(ecfg)["headline"]
        tasks = json.loads((output_dir / "eval_captions/metrics.json").read_text())["tasks"]
        captions = {"meteor": headline.get("meteor"), "bleu4": headline.get("bleu4"), "rouge_l": headline.get("rouge_l"),
                    "caption_n": tasks["caption"].get("n"), "caption_backend": tasks["caption"].get("backend")}
    out = {**counts, "peak_rss_mib": peak_rss,
           "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steps[2:] or steps),
           "train_loss_last": steps[-1]["loss"], "eval_loss": evals[-1]["eval_loss"] if evals else None,
           "classify_accuracy": result.get("classify_accuracy"), "classify_n": result.get("classify_n"), **captions,
           "train_s": train_s, "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
           "overrides": VARIANTS[args.child]}
    Path(args.child_out).write_text(json.dumps(out, indent=1) + "\n")


def table(results: dict) -> str:
    rows = ["| variant | trainable params | weights MiB | grads MiB | AdamW MiB | weights+AdamW vs full | peak RSS MiB "
            "| tokens/s | held-out loss | class acc (n) | METEOR (n) |", "|---" * 11 + "|"]
    full = results.get("full")
    for name, r in results.items():
        wo = r["weight_bytes"] + r["optimizer_bytes"]
        ratio = f"{wo / (full['weight_bytes'] + full['optimizer_bytes']):.3f}" if full else "-"
        mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        acc = f"{r['classify_accuracy']:.3f} ({r['classify_n']})" if r["classify_accuracy"] is not None else "-"
        meteor = f"{r['meteor']:.3f} ({r['caption_n']})" if r.get("meteor") is not None else "-"
        rows.append(f"| {name} | {r['trainable_params']:,} | {mib(r['weight_bytes'])} | {mib(r['grad_bytes'])} | "
                    f"{mib(r['optimizer_bytes'])} | {ratio} | {r['peak_rss_mib']:.0f} | {r['tokens_per_s']:,.0f} | "
                    f"{loss} | {acc} | {meteor} |")
    return "\n".join(rows)


@dataclass
class BenchConfig:
    out: str = ""  # JSON file for the results (required)
    recipe: str = "launch/configs/debug"  # the config directory whose moe.yaml (and evaluate.yaml) the variants use
    run: str = "runs/demo"  # that recipe's run directory: RUN/llm/final is the start, RUN/annotations the data
    root: str = ""  # scratch directory of the runs (default runs/bench_peft_moe/<recipe name>)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 0  # 0 = the recipe's max_steps
    learning_rate: float = 0.0  # 0 = the recipe's, for every variant
    eval_batches: int = 0  # 0 = the recipe's
    classify_eval: int = 0  # held-out classification records for class accuracy; 0 = the recipe's classify_eval
    caption_eval: int = 50  # held-out captions for METEOR (evaluate.py on the export); 0 = skipped
    child: str = ""  # set by the parent: the variant this child process runs ...
    child_out: str = ""  # ... and the JSON it writes


def main(args: BenchConfig) -> None:
    if args.child:
        return child(args)
    if not args.out:
        raise SystemExit("--out is required: the JSON file for the results")
    names = list(args.variants)
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    stage = recipe_stage(args.recipe, args.run)
    missing = [p for p in [f"{stage['init_from']}/config.json", *stage["train_data"]] if not (REPO / p).is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: run the recipe through its llm stage first "
                         f"(launch/recipe.sh {args.recipe} {args.run}; make demo / make demo-real)")
    root = Path(args.root or REPO / "runs/bench_peft_moe" / Path(args.recipe).name)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        child_out = root / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", name, "--child_out", str(child_out), "--recipe", args.recipe,
               "--run", args.run, "--root", str(root), "--steps", str(args.steps), "--learning_rate",
               str(args.learning_rate), "--eval_batches", str(args.eval_batches), "--classify_eval",
               str(args.classify_eval), "--caption_eval", str(args.caption_eval)]
        log = root / f"{name}.log"
        with log.open("w") as f:  # the recipe's relative paths are from the repository root
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode:
                raise SystemExit(f"variant {name} failed: see {log}")
        results[name] = json.loads(child_out.read_text())
        if "eval_loss_half_rank" in results[name]:  # same run, its adapter cut to r/2 (accuracy, METEOR not measured)
            results[f"{name} r/2"] = {**results[name], "eval_loss": results[name]["eval_loss_half_rank"],
                                      "classify_accuracy": None, "meteor": None}
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'overrides'})}", flush=True)
    steps, lr = args.steps or stage["max_steps"], args.learning_rate or stage["learning_rate"]
    summary = {"recipe": args.recipe, "start": stage["init_from"], "steps": steps, "learning_rate": lr,
               "shapes": f"{stage['num_experts']} experts top-{stage['top_k']}, micro-batch {stage['micro_batch_size']}"
                         f" x accum {stage.get('grad_accum', 1)}, max_length {stage['max_length']}, "
                         f"{Path(stage['ds_config']).name}",
               "bytes": "weights as held (fp32; nf4 packed + quant state), grads = trainable x element size, "
                        "AdamW = 8 bytes per trainable element", "variants": results}
    if "full" in results and "qlora" in results:
        f, q = results["full"], results["qlora"]
        summary["qlora_over_full_weights_plus_optimizer"] = (q["weight_bytes"] + q["optimizer_bytes"]) / (
            f["weight_bytes"] + f["optimizer_bytes"])
        if f["classify_accuracy"] is not None and q["classify_accuracy"] is not None:
            summary["qlora_minus_full_class_accuracy"] = q["classify_accuracy"] - f["classify_accuracy"]
    if "dynamic_rank r/2" in results:
        d = results["dynamic_rank"]
        summary["dynamic_rank_half_over_full_eval_loss"] = d["eval_loss_half_rank"] / d["eval_loss"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{args.recipe} from {stage['init_from']}: {summary['shapes']}; {steps} steps at lr {lr:g}\n")
    print(table(results))
    for key, target in (("qlora_over_full_weights_plus_optimizer", "<= 0.4"),
                        ("qlora_minus_full_class_accuracy", "within 0.03"),
                        ("dynamic_rank_half_over_full_eval_loss", "<= 1.02")):
        if key in summary:
            print(f"{key}: {summary[key]:.4f} (target {target})")


if __name__ == "__main__":
    from semivlm.config import load_config

    main(load_config(BenchConfig))
