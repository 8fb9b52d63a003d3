import pytest
import torch
from conftest import run_cli

from fashioncnn.core.config import ConfigError
from fashioncnn.core.model import ModelSpec, build_model, count_parameters

# Published in the study (seed-study.md), and derived from its description for the rest of its grid.
PUBLISHED = {"M2.2.32.32": 679_466, "M3.3.32.32": 29_482}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_parameter_counts_match_the_study(name, count):
    assert count_parameters(build_model(ModelSpec.from_name(name))) == count


def test_one_conv_block_model_has_the_studys_24_6_million_parameters():
    count = count_parameters(build_model(ModelSpec.from_name("M1.3.32.32")))
    assert round(count / 1e6, 1) == 24.6


def test_layers_follow_the_study_description():
    # M2.2.32.32 is 1152 -> 576 -> 10; M2.4.32.64 halves three times after 64*6*6 = 2304 features.
    assert ModelSpec.from_name("M2.2.32.32").linear_widths() == [1152, 576, 10]
    assert ModelSpec.from_name("M2.4.32.64").linear_widths() == [2304, 1152, 576, 288, 10]
    assert ModelSpec.from_name("M3.3.32.32").feature_map_sizes() == [14, 6, 2]
    model = build_model(ModelSpec.from_name("M2.3.16.32"))
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.padding) for c in convs] == [(1, 16, (1, 1)), (16, 32, (0, 0))]
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("M4.2.32.32", "M4.2.32.32: conv block 4 gets a 2x2 feature map, too small for a 3x3 kernel"),
        ("M3.9.16.32", "M3.9.16.32: linear layer widths 128 -> 64"),
    ],
)
def test_collapsing_models_are_refused_before_building(name, expected):
    with pytest.raises(ConfigError, match=expected):
        build_model(ModelSpec.from_name(name))


def test_model_command_prints_layers_shapes_and_total(tmp_path):
    result = run_cli(["M2.3.32.64"], cwd=tmp_path, module="fashioncnn.model")
    assert result.returncode == 0, result.stderr
    assert "M2.3.32.64" in result.stdout
    assert "32x28x28" in result.stdout and "64x6x6" in result.stdout and "2304" in result.stdout
    total = count_parameters(build_model(ModelSpec.from_name("M2.3.32.64")))
    assert f"total parameters: {total:,}" in result.stdout


def test_model_command_rejects_bad_names_in_one_line(tmp_path):
    result = run_cli(["M4.2.32.32", "M2x"], cwd=tmp_path, module="fashioncnn.model")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: M4.2.32.32: conv block 4 gets a 2x2 feature map, too small for a 3x3 kernel; "
        "with kernel 3 on 28x28 images at most 3 conv blocks fit (model.conv=4)",
        "error: model name 'M2x': not allowed, must look like M2.3.32.64 (M<conv>.<lin>.<filter_in>.<filter_out>)",
    ]
