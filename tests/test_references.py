"""Every path the repository names in prose exists, or is written by a recipe stage.

Read: comments and docstrings of *.py, comments and values of *.yaml, the whole of *.sh / *.sbatch / Makefile, and the
code (fenced and inline) of *.md. A reference is a relative path starting with one of the repository's top-level
directories (launch/, data_prep/, tests/, ...), a path starting with ../, or a bare file name ending in
.py/.sh/.sbatch/.yaml. It is true when:
- a ../ path, read from the file's directory, stays inside the repository (prose cites no file outside it; a ../ path
  that stays inside is usually relative to a data file, e.g. a record's image, so it is not looked up);
- the path exists (globs and `{a,b}` expanded, `<placeholder>` matching any name); a bare name exists somewhere in
  the repository or in an installed distribution (DeepSpeed's stage3.py, Liger's monkey_patch.py);
- or it lies in `runs/<run>/`, under a stage output that `launch/recipe.sh --list` prints for a config directory: a
  YAML in launch/configs/<dir>/ must name outputs of that directory's own recipe (unless the run name is itself a
  `<placeholder>`: another recipe's run), other files those of any recipe;
- or it lies under the `--out` / `--output_dir` of a command shown in the same file (a standalone example's output).
Paths under anything else (output_dir/..., RUN_DIR/..., /data/...) and hub ids (Qwen/...) are not repository paths.
"""
from __future__ import annotations

import ast
import glob
import importlib.metadata
import io
import re
import subprocess
import tokenize
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in
             ("runs", "semivlm.egg-info")) + ["runs"]
EXT = ("py", "sh", "sbatch", "yaml", "yml", "json")
BARE = ("py", "sh", "sbatch", "yaml")  # bare .json names are outputs or Hugging Face files (config.json, stats.json)
SEGMENT = r"(?:[\w.*{},+-]|<[^<>\n]{1,40}>)+"
PATH = re.compile(rf"(?<![\w./$~@:-])((?:\.\./)+(?:{SEGMENT}/?)+|(?:{'|'.join(map(re.escape, TOP))})/(?:{SEGMENT}/?)*"
                  rf"|[\w-]+\.(?:{'|'.join(BARE)}))(?![\w/(-])")
# Names that are not this repository's files, each for a stated reason.
NOT_OURS = {"setup.py"}  # Python packaging's generic name, in prose about installing


@lru_cache(maxsize=None)
def repo_files() -> tuple[str, ...]:
    return tuple(subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, text=True,
                                capture_output=True, check=True).stdout.split())


@lru_cache(maxsize=None)
def installed_names() -> frozenset[str]:
    """File names shipped by the installed distributions (the prose cites e.g. DeepSpeed's stage_1_and_2.py)."""
    return frozenset(Path(str(f)).name for d in importlib.metadata.distributions() for f in (d.files or ()))


def sources() -> list[Path]:
    keep = [REPO / p for p in repo_files() if p.endswith((".py", ".sh", ".sbatch", ".yaml", ".md")) or p.endswith("Makefile")]
    # data/corpus is the built-in corpus text (semiconductor prose, not documentation of this repository)
    return [p for p in keep if p.is_file() and not p.relative_to(REPO).as_posix().startswith("data/corpus/")]


def prose(path: Path) -> str:
    """The parts of a file that name paths to a reader."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        parts = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                parts.append(ast.get_docstring(node) or "")
        return "\n".join(parts)
    if path.suffix == ".yaml":
        def values(v):
            if isinstance(v, dict):
                return [x for item in v.values() for x in values(item)]
            if isinstance(v, list):
                return [x for item in v for x in values(item)]
            return [v] if isinstance(v, str) else []
        comments = [m.group(0) for m in re.finditer(r"#.*", text)]
        return "\n".join(values(yaml.safe_load(text)) + comments)
    if path.suffix == ".md":
        blocks = re.findall(r"```.*?\n(.*?)```", text, flags=re.S)
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        return "\n".join(blocks + inline)
    return text  # shell, sbatch, Makefile: commands and comments alike name repository paths


def references(path: Path) -> set[str]:
    refs = {m.group(1).rstrip(".,:;") for m in PATH.finditer(prose(path))}
    return {r for r in refs if not re.fullmatch(r"\w+/\w", r)}  # a rate, not a path: docs/s


def example_outputs(path: Path) -> set[str]:
    """The --out / --output_dir values of the commands a file shows."""
    return {m.group(1).rstrip("/") for m in re.finditer(r"--(?:out|output_dir)[ =]+(runs/[^\s\"'`,;]+)", prose(path))}


@lru_cache(maxsize=None)
def stage_outputs(config_dir: str) -> frozenset[str]:
    """Paths under RUN_DIR that `launch/recipe.sh CONFIG_DIR RUN --list` says its stages write."""
    out = subprocess.run(["bash", "launch/recipe.sh", config_dir, "RUN", "--list"], cwd=REPO, text=True,
                         capture_output=True, check=True).stdout
    return frozenset(line.split()[1].removeprefix("RUN/") for line in out.splitlines() if line.strip())


def recipe_dirs() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "launch/configs").iterdir() if p.is_dir())


def expand(ref: str) -> list[str]:
    """`a/{b,c}/d` -> a/b/d, a/c/d; `<stage>` and `*` -> a glob."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", ref)
    if m:
        return [x for alt in m.group(1).split(",") for x in expand(ref[:m.start()] + alt + ref[m.end():])]
    return [re.sub(r"<[^<>]*>", "*", ref)]


def produced(ref: str, source: Path) -> bool:
    """`ref` is runs/<run name>/<path in a stage's output>, that stage being in the recipe that `source` belongs to."""
    if ref.split("/")[0] != "runs":
        return False
    if any(ref.rstrip("/") == o or ref.startswith(o + "/") for o in example_outputs(source)):
        return True
    rel = source.relative_to(REPO).parts if source.is_relative_to(REPO) else ()
    own = rel[:2] == ("launch", "configs") and source.suffix == ".yaml" and not ref.startswith("runs/<")
    dirs = ["/".join(rel[:3])] if own else recipe_dirs()
    allowed = {"report.md", "logs", ".recipe"} | {o for d in dirs for o in stage_outputs(d)}
    for alt in expand(ref):
        parts = alt.rstrip("/").split("/")
        rest = "/".join(parts[2:])
        if len(parts) > 2 and not any(fnmatch(rest, o) or fnmatch(rest, o + "/*") or fnmatch(o, rest)
                                      for o in allowed):
            return False
    return True


def exists(ref: str) -> bool:
    for alt in expand(ref):
        if "/" not in alt:  # a bare name: somewhere in the repository or in a dependency
            # an upper-case name is a placeholder (YOUR_CONFIG.yaml, SCRIPT.py)
            if alt in NOT_OURS or any(c.isupper() for c in alt.split(".")[0]) or \
                    alt in {Path(f).name for f in repo_files()} or alt in installed_names():
                continue
            return False
        if not glob.glob(str(REPO / alt)):
            return False
    return True


def stale(path: Path) -> list[str]:
    """References in `path` that neither exist nor are written by a recipe stage."""
    def true(ref: str) -> bool:
        if ref.startswith("../"):
            return (path.parent / ref).resolve().is_relative_to(REPO)
        return exists(ref) or produced(ref, path)
    return sorted(r for r in references(path) if not true(r))


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_path_a_file_names_exists_or_is_a_recipe_output(path):
    assert not stale(path), f"{path.relative_to(REPO)} names paths that are neither in the repository nor written by " \
                            f"a recipe stage: {stale(path)}"


def test_the_check_catches_a_missing_file_and_an_output_no_stage_of_that_recipe_writes(tmp_path):
    config = REPO / "launch/configs/micrograph_vlm/llm.yaml"  # judged against micrograph_vlm's own stages
    assert produced("runs/x/annotations/vqa.jsonl", config) and produced("runs/<run>/llm/final", config)
    assert not produced("runs/x/instructions/instructions.jsonl", config)  # micrograph_vlm has no instructions stage
    assert produced("runs/x/instructions/instructions.jsonl", REPO / "README.md")  # the debug recipe writes it
    assert not produced("runs/demo/synth/manifest.jsonl", REPO / "README.md")  # no stage is called synth
    assert not exists("launch/configs/micrograph_vlm/vision.yaml") and exists("launch/configs/debug/vision.yaml")
    assert exists("launch/configs/{debug,micrograph_vlm}/llm.yaml")
    assert not exists("launch/configs/{debug,micrograph_vlm}/vision.yaml")
    assert not exists("no_such_script.py") and exists("annotate.py")
    doc = tmp_path / "note.py"
    doc.write_text('"""Run data_prep/annotate.py --manifest runs/demo/synth/manifest.jsonl (../shared/DESIGN.md)."""\n'
                   "x = 'data_prep/not_in_prose.py'  # see semivlm/nowhere.py, then output_dir/final/config.json\n")
    assert references(doc) == {"data_prep/annotate.py", "runs/demo/synth/manifest.jsonl", "semivlm/nowhere.py",
                               "../shared/DESIGN.md"}
    assert stale(doc) == ["../shared/DESIGN.md", "runs/demo/synth/manifest.jsonl", "semivlm/nowhere.py"]
    assert references(REPO / "data_prep/build_corpus.py") >= {"data_prep/build_corpus.py"} and \
        "docs/s" not in references(REPO / "data_prep/build_corpus.py")
    doc.write_text('"""Run data_prep/convert.py --to llava --out runs/demo/llava, then read runs/demo/llava/x.json'
                   ' and runs/demo/llama/x.json."""\n')
    assert stale(doc) == ["runs/demo/llama/x.json"]  # only the command's own --out is an output
