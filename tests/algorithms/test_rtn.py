import torch

from signround.algorithms import LayerTask, get_algorithm
from signround.config import WeightScheme
from signround.quant.integer import dequantize_weight


def test_rtn_rounds_each_layer_to_nearest_grid_point():
    layer = torch.nn.Linear(64, 16)
    scheme = WeightScheme(4, 32, False)
    result = get_algorithm("rtn").quantize_block(torch.nn.Sequential(layer), [LayerTask("0", layer, scheme)], None, None)
    qw = result.weights["0"]
    err = (dequantize_weight(qw) - layer.weight).abs()
    step = qw.scale.float().repeat_interleave(32, dim=1)
    assert torch.all(err <= step * 0.5 + 1e-6)
