"""`gnm merge` / `merge_adapters`: LoRA adapters merged with PEFT's TIES, checked on a tiny Llama."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gnm_trainer.cli import main
from gnm_trainer.merging import MERGE_INFO_FILE, merge_adapters
from gnm_trainer.model_loading import load_model_and_tokenizer
from gnm_trainer.target import build_tiny_llama

TARGETS = ["q_proj", "v_proj"]


def save_adapter(base_dir, adapter_dir, tokenizer, seed, r=2, target_modules=TARGETS):
    """A LoRA adapter over the saved base with random A and B (as if trained), saved with its tokenizer."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=4, target_modules=target_modules, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return str(adapter_dir)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_tokenizer):
    """A saved tiny base model and LoRA adapters over it: `a` and `b` (same rank and modules), `q_only` (other
    target modules) and `rank4` (another rank)."""
    root = tmp_path_factory.mktemp("merge")
    base_dir = str(root / "base")
    build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    return {
        "base": base_dir,
        "a": save_adapter(base_dir, root / "a", tiny_tokenizer, seed=1),
        "b": save_adapter(base_dir, root / "b", tiny_tokenizer, seed=2),
        "q_only": save_adapter(base_dir, root / "q_only", tiny_tokenizer, seed=3, target_modules=["q_proj"]),
        "rank4": save_adapter(base_dir, root / "rank4", tiny_tokenizer, seed=4, r=4),
    }


def lora_factors(adapter_dir):
    """{module: (A, B, scaling)} read from the saved files, independently of PEFT's loading."""
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    modules = sorted({key.split(".lora_A.")[0] for key in weights if ".lora_A." in key})
    return {m: (weights[f"{m}.lora_A.weight"], weights[f"{m}.lora_B.weight"], scaling) for m in modules}


def weight_updates(adapter_dir):
    """{module: B @ A * scaling}: what the adapter adds to each weight."""
    return {module: b @ a * scaling for module, (a, b, scaling) in lora_factors(adapter_dir).items()}


def ties_by_hand(tensors, weights, density):
    """TIES (Yadav et al., 2023) on one tensor per source: keep each source's `density` share of largest-magnitude
    entries, elect per entry the sign of the kept entries' sum, average the weighted kept entries of that sign."""
    kept = []
    for tensor in tensors:
        keep = int(density * tensor.numel())
        threshold = tensor.abs().flatten().sort(descending=True).values[keep - 1]
        kept.append(torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor)))
    kept = torch.stack(kept)
    elected = torch.where(kept.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = kept.sign() == elected
    weighted = kept * torch.tensor(weights).view(-1, 1, 1)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def file_hashes(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


def run_merge(capsys, *argv):
    """`gnm merge ARGV`: (exit status, stderr)."""
    status = main(["merge", *map(str, argv)])
    return status, capsys.readouterr().err


def test_merging_an_adapter_with_itself_gives_its_update(adapters, tmp_path):
    """Two identical sources agree on every sign, so TIES at density 1 and weights 1, 1 keeps the update as it was
    (PEFT folds the scaling into the factors: the merged adapter has lora_alpha == r)."""
    merged = merge_adapters([adapters["a"], adapters["a"]], tmp_path / "merged", weights=[1.0, 1.0], density=1.0)
    expected, got = weight_updates(adapters["a"]), weight_updates(merged)
    assert sorted(got) == sorted(expected) and len(got) == 4  # q_proj and v_proj of 2 layers
    for module, update in expected.items():
        assert update.abs().sum() > 0
        torch.testing.assert_close(got[module], update)


def test_gnm_merge_is_ties_on_the_lora_factors_and_leaves_the_sources(adapters, tmp_path, capsys):
    """PEFT's `ties` merges the A factors and the B factors of the sources, each source weighted by
    sqrt(weight * scaling); the merged folder says what was merged, and the sources are not touched."""
    sources = [adapters["a"], adapters["b"]]
    before = [file_hashes(path) for path in sources]
    status, error = run_merge(capsys, *sources, "--output_dir", tmp_path / "merged", "--weights", 1.0, 0.5,
                              "--density", 0.5)
    assert status == 0, error
    merged = lora_factors(tmp_path / "merged")
    factors = [lora_factors(path) for path in sources]
    for module, (merged_a, merged_b, merged_scaling) in merged.items():
        factor_weights = [(weight * source[module][2]) ** 0.5 for weight, source in zip((1.0, 0.5), factors)]
        a_factors, b_factors = [source[module][0] for source in factors], [source[module][1] for source in factors]
        torch.testing.assert_close(merged_a, ties_by_hand(a_factors, factor_weights, 0.5))
        torch.testing.assert_close(merged_b, ties_by_hand(b_factors, factor_weights, 0.5))
        assert merged_scaling == 1.0
    assert [file_hashes(path) for path in sources] == before
    info = json.loads((tmp_path / "merged" / MERGE_INFO_FILE).read_text())
    assert info["combination_type"] == "ties" and info["density"] == 0.5 and info["weights"] == [1.0, 0.5]
    assert [source["path"] for source in info["sources"]] == [os.path.abspath(path) for path in sources]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: peft" in card and "| 0.5 |" in card


def test_the_merged_adapter_loads_and_generates(adapters, tmp_path):
    merged = merge_adapters([adapters["a"], adapters["b"]], tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(adapters["base"])
    base = AutoModelForCausalLM.from_pretrained(adapters["base"])
    model = PeftModel.from_pretrained(base, merged)
    assert list(model.peft_config) == ["default"]  # only the merged adapter, none of the sources
    model, tokenizer = load_model_and_tokenizer(merged)  # what `gnm evaluate --model` loads
    prompt = tokenizer("Where was Borin Tal born?", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 4


def test_ties_svd_merges_adapters_of_different_ranks(adapters, tmp_path):
    merged = merge_adapters([adapters["a"], adapters["rank4"]], tmp_path / "merged", combination_type="ties_svd")
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["r"] == 4
    assert all(update.abs().sum() > 0 for update in weight_updates(merged).values())


def edited_copy(source, destination, **fields):
    """A copy of an adapter folder with fields of its adapter_config.json replaced."""
    shutil.copytree(source, destination)
    path = os.path.join(destination, "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(fields)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return str(destination)


def without_weights(source, destination):
    shutil.copytree(source, destination)
    os.remove(os.path.join(destination, "adapter_model.safetensors"))
    return str(destination)


BAD_INPUTS = {
    "missing folder": (lambda a, tmp: [a["a"], tmp / "nowhere"], [], "nowhere: no such adapter folder"),
    "not an adapter": (lambda a, tmp: [a["a"], a["base"]], [], "not a PEFT adapter folder"),
    "AdaLoRA adapter": (
        lambda a, tmp: [a["a"], edited_copy(a["b"], tmp / "ada", peft_type="ADALORA")], [], "'peft_type' is 'ADALORA'"
    ),
    "rsLoRA adapter": (
        lambda a, tmp: [a["a"], edited_copy(a["b"], tmp / "rs", use_rslora=True)], [], "field 'use_rslora' is true"
    ),
    "DoRA adapter": (
        lambda a, tmp: [edited_copy(a["a"], tmp / "dora", use_dora=True), a["b"]], [], "field 'use_dora' is true"
    ),
    "no weights": (lambda a, tmp: [a["a"], without_weights(a["b"], tmp / "empty")], [], "no adapter weights"),
    "other base model": (
        lambda a, tmp: [a["a"], edited_copy(a["b"], tmp / "other", base_model_name_or_path=str(tmp))], [],
        "field 'base_model_name_or_path'",
    ),
    "other target modules": (lambda a, tmp: [a["a"], a["q_only"]], [], "field 'target_modules'"),
    "other rank": (lambda a, tmp: [a["a"], a["rank4"]], [], "field 'r' is 4"),
    "one adapter": (lambda a, tmp: [a["a"]], [], "adapters: 1 given"),
    "weights count": (lambda a, tmp: [a["a"], a["b"]], ["--weights", "1", "2", "3"], "weights: 3 given for 2"),
    "density 0": (lambda a, tmp: [a["a"], a["b"]], ["--density", "0"], "density: 0.0 is outside (0, 1]"),
    "density above 1": (lambda a, tmp: [a["a"], a["b"]], ["--density", "1.5"], "density: 1.5 is outside (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_line_and_writes_nothing(adapters, tmp_path, capsys, case):
    make_sources, flags, expected = BAD_INPUTS[case]
    sources = make_sources(adapters, tmp_path)
    before = sorted(os.listdir(tmp_path))
    status, error = run_merge(capsys, *sources, "--output_dir", tmp_path / "merged", *flags)
    assert status == 2
    assert error.count("\n") == 1 and error.startswith("gnm merge: error: ") and expected in error, error
    assert sorted(os.listdir(tmp_path)) == before


def test_a_non_empty_output_dir_is_replaced_only_when_asked(adapters, tmp_path, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("earlier run")
    status, error = run_merge(capsys, adapters["a"], adapters["b"], "--output-dir", output)
    assert status == 2 and "is not empty" in error and "--overwrite_output_dir" in error
    assert sorted(os.listdir(output)) == ["keep.txt"]
    status, error = run_merge(capsys, adapters["a"], adapters["b"], "--output-dir", output, "--overwrite-output-dir")
    assert status == 0, error
    assert not (output / "keep.txt").exists() and (output / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no temporary folder left beside it


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def merging_section_commands(model):
    """The commands of the "Adapter merging (ZJUKLAB)" section of a recipe README, as argument lists."""
    import re
    import shlex

    with open(os.path.join(ROOT, "recipes", model, "semeval25", "README.md"), encoding="utf-8") as handle:
        section = handle.read().split("## Adapter merging (ZJUKLAB)", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("model", ["olmo-7b", "olmo-1b"])
def test_the_recipe_merging_section_parses(model, monkeypatch):
    """The two documented runs parse strictly and are what the section says: NPO+GD+KL, rank 32, one weighting
    forgetting higher with twice the steps; the merge line names both runs and keeps ZJUKLAB's defaults."""
    from gnm_trainer.cli import _build_argparse_parser
    from gnm_trainer.cli.unlearn import parse_arguments

    monkeypatch.chdir(ROOT)
    commands = merging_section_commands(model)
    assert [command[:2] for command in commands] == [["gnm", "unlearn"]] * 2 + [["gnm", "merge"], ["gnm", "evaluate"]]
    # bf16 is overridden only because this CPU cannot train in bf16.
    runs = [parse_arguments([*command[2:], "--bf16", "false"]) for command in commands[:2]]
    over, under = (training_args for _, training_args, _ in runs)
    assert over.loss_weights == {"npo": 0.4, "gd": 0.2, "klr": 0.4}
    assert under.loss_weights == {"npo": 0.3, "gd": 0.4, "klr": 0.3}
    assert over.max_steps == 2 * under.max_steps
    assert all((model_args.lora_r, model_args.lora_alpha) == (32, 32) for _, _, model_args in runs)
    parser, _ = _build_argparse_parser()
    merge = parser.parse_args(commands[2][1:])
    assert merge.adapters == [over.output_dir, under.output_dir]
    assert (merge.combination_type, merge.density, merge.weights) == ("ties", 0.8, None)
