import pytest
import torch

from signround.algorithms import LayerTask, get_algorithm
from signround.config import WeightScheme
from signround.quant.integer import dequantize_weight


@pytest.mark.parametrize("seed", range(20))
def test_rtn_rounds_each_layer_to_nearest_grid_point(seed):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(64, 16)
    scheme = WeightScheme(4, 32, False)
    result = get_algorithm("rtn").quantize_block(torch.nn.Sequential(layer), [LayerTask("0", layer, scheme)], None, None)
    qw = result.weights["0"]
    err = (dequantize_weight(qw) - layer.weight).abs()
    step = qw.scale.float().repeat_interleave(32, dim=1)
    # Half a step, plus what storing the scale in fp16 (relative error <= 2**-11) shifts the top of a 15-step range.
    assert torch.all(err <= step * (0.5 + 15 * 2**-11) + 1e-6)
