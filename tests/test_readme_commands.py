"""The README's llava-1.5-7b commands, run as written (issue 25, item 5).

The fenced block in 'Using the real weights' sets $MODELS, $DATA and $TESTS and runs train_sft.py,
train_rft.py and eval.py. This test reads that block, puts the small real-format files the other tests
build in place of /models/... and /data/... (the llava-hf folder, HMR2.0 checkpoint and SMPL file of
test_real_preset.py; PoseScript/AMASS, Human3.6M, 3DPW and LLaVA-Instruct of test_rft_real.py; the
BGE-M3 folder of test_bge.py), a temporary folder in place of out/, and python in place of torchrun,
adds only a few-steps flag set (sizes, never a recipe setting), and runs the three commands. It checks
that PoseWorld is never built, that every sample came from the real sets, that the RFT run's effective
recipe is the paper's, and that everything lands in the command's --out_dir. The scripts' docstrings
carry the same command lines."""
import json
import os
import re
import shlex

import pytest

import data
import eval as E
import train_rft
import train_sft
from test_bge import _write_spec, hf_dir, hf_model, trained_spec  # noqa: F401  (fixtures)
from test_real_preset import files  # noqa: F401  (a fixture)
from test_rft_real import real_data  # noqa: F401  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a few steps: sizes only (the recipe's own settings, lr, beta, G, pose samples, KL, stay the README's)
FEW = {"train_sft.py": ["--max_steps=2", "--batch_size=4", "--micro_batch=2", "--retriever_steps=2",
                        "--retriever_batch=16", "--dtype=float32", "--num_threads=1"],
       "train_rft.py": ["--max_steps=2", "--batch_size=4", "--micro_batch=2", "--G=2", "--max_new_tokens=8",
                        "--dtype=float32", "--num_threads=1", "--gallery_every=1"],
       "eval.py": ["--limit=8", "--agreement_prompts=0"]}


def readme_block():
    """The shell block of the README that runs train_sft.py with --preset=llava-1.5-7b."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return next(b for b in blocks if "train_sft.py --preset=llava-1.5-7b" in b)


def readme_commands(block):
    """{script: argv} of the block's command lines, its NAME="..." variables expanded."""
    variables = {name: " ".join(value.split()) for name, value in re.findall(r'^(\w+)="([^"]*)"', block, re.M)}
    commands = {}
    for line in block.splitlines():
        if line.startswith(("torchrun ", "python ")):
            words = shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line))
            script = next(w for w in words if w.endswith(".py"))
            commands[script] = words[words.index(script) + 1:]
    return commands


def test_the_docstrings_carry_the_readme_commands():
    lines = [line for line in readme_block().splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 2
    for script, line in zip((train_sft, train_rft), lines):
        assert "    " + line + "\n" in script.__doc__, script.__name__


@pytest.fixture
def bge_dir(hf_dir, trained_spec, tmp_path):  # noqa: F811
    folder = tmp_path / "bge-m3"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_dir / name).read_bytes())
    _write_spec(trained_spec, "bge-m3", folder)
    return str(folder)


@pytest.mark.slow
def test_the_readme_7b_commands_train_the_papers_recipe_on_real_data(files, real_data, bge_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    ps_root, amass = real_data["posescript"]
    root = real_data["root"]
    where = {"/models/llava-1.5-7b-hf": files["llava"], "/models/hmr2/epoch=35-step=1000000.ckpt": files["hmr2"],
             "/models/smpl/SMPL_NEUTRAL.pkl": files["smpl"], "/models/smpl/SMPL_MALE.pkl": files["smpl"],
             "/models/smpl/SMPL_FEMALE.pkl": files["smpl"], "/models/J_regressor_h36m.npy": real_data["regressor"],
             "/models/bge-m3": bge_dir, "/data/posescript": ps_root, "/data/amass": amass,
             "/data/h36m/h36m_train.npz": str(root / "h36m_train.npz"), "/data/h36m/images": str(root / "h36m"),
             "/data/h36m/h36m_valid_protocol2.npz": real_data["h36m_test"], "/data/3DPW": real_data["pw3d"],
             "/data/llava/llava_instruct_150k.json": str(root / "llava_instruct_150k.json"),
             "/data/coco/train2017": str(root / "coco"), "out/": str(tmp_path / "out") + "/"}

    def substitute(word):
        key, eq, value = word.partition("=")
        for path, here in where.items():
            if eq and (value == path or (path == "out/" and value.startswith(path))):
                return f"{key}={value.replace(path, here, 1)}"
        assert not eq or not value.startswith(("/models", "/data", "out/")), f"no test file for {word}"
        return word

    commands = {script: [substitute(w) for w in argv] for script, argv in readme_commands(readme_block()).items()}
    assert set(commands) == {"train_sft.py", "train_rft.py", "eval.py"}

    def no_poseworld(*args, **kwargs):
        raise AssertionError("PoseWorld was built by a README 7B command")
    monkeypatch.setattr(data, "PoseWorld", no_poseworld)
    train_sft.main(commands["train_sft.py"] + FEW["train_sft.py"])
    train_rft.main(commands["train_rft.py"] + FEW["train_rft.py"])
    E.main(commands["eval.py"] + FEW["eval.py"])

    sft_dir, rft_dir = tmp_path / "out" / "llava-1.5-7b-sft", tmp_path / "out" / "llava-1.5-7b-rft"
    assert sorted(os.listdir(tmp_path / "out")) == ["llava-1.5-7b-rft", "llava-1.5-7b-sft"]  # nowhere else
    for run in (sft_dir, rft_dir):
        assert (run / "checkpoint" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    assert (rft_dir / "results.md").is_file() and (rft_dir / "eval.json").is_file()

    # the effective recipe of the RFT run: the paper's, and the sources say so
    extra = json.load(open(rft_dir / "checkpoint" / "config.json"))["extra"]
    cfg, sources = extra["config"], extra["sources"]
    assert (cfg["preset"], cfg["lr"], cfg["beta"], cfg["beta_i2p"], cfg["pose_samples"], cfg["gradient_at_mean"],
            cfg["pose_kl"], cfg["clip_eps"], cfg["min_lr_ratio"], cfg["beta1"], cfg["beta2"]) == \
        ("llava-1.5-7b", 1e-6, 0.04, 0.04, 1, 0.0, "k3", 0.2, 0.0, 0.9, 0.95)
    assert cfg["data"] == "posescript,h36m,llava_instruct" and sources["lr"] == "paper: Table 4"
    foot = open(rft_dir / "results.md").read().split("where this RFT run departs from the paper")[1]
    foot = foot.split("and its SFT run")[0]
    departs = [line.split("|")[1].strip() for line in foot.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert departs == ["RFT batch, lr, steps"], departs  # only this test's few steps of 4 prompts

    # every prompt came from the real sets: each task's rewards were logged, none from PoseWorld
    rows = [json.loads(line) for line in open(rft_dir / "metrics.jsonl")]
    tasks = {k.split("/")[2] for r in rows for k, v in r.items() if k.startswith("reward/") and v == v}
    assert tasks == {"t2p", "i2p", "vqa"}, tasks
    after = json.load(open(rft_dir / "eval_after.json"))
    assert set(after["protocols"]) >= {"h36m", "posescript"} and after["posescript_n"] > 0
    result = json.load(open(rft_dir / "eval.json"))
    assert result["h36m_n"] > 0 and result["posescript_n"] > 0 and "t2p_posecode_acc" not in result
