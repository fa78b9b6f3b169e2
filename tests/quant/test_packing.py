import pytest
import torch

from signround.quant.packing import pack_qweight, pack_qzeros, pack_rows, packed_rows, unpack_qweight, unpack_qzeros, unpack_rows


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("rows", [32, 64, 96, 50, 7])
def test_pack_unpack_is_exact_inverse(bits, rows):
    codes = torch.randint(0, 2**bits, (rows, 9), generator=torch.Generator().manual_seed(bits * rows))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(rows, bits), 9)
    assert torch.equal(unpack_rows(packed, bits, rows), codes.to(torch.uint8))


def _gptq_reference(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's own packing loop (as in the GPTQ/AutoGPTQ repos) for comparison, written from the format's description."""
    iw = intweight.to(torch.int64).tolist()
    rows, cols = len(iw), len(iw[0])
    out = [[0] * cols for _ in range(rows * bits // 32)]
    for c in range(cols):
        stream = 0
        for i in range(rows):
            stream |= iw[i][c] << (i * bits)
        for r in range(rows * bits // 32):
            word = (stream >> (32 * r)) & 0xFFFFFFFF
            out[r][c] = word - (1 << 32) if word >= 1 << 31 else word
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_is_gptq_bitstream(bits):
    codes = torch.randint(0, 2**bits, (64, 5), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_rows(codes, bits), _gptq_reference(codes, bits))


def test_four_bit_word_holds_eight_values_lowest_first():
    codes = torch.arange(8).view(8, 1).repeat(4, 1)  # 32 rows: 0..7 four times
    word = pack_rows(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x76543210


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_and_qzeros_shapes_follow_gptq(bits):
    codes = torch.randint(0, 2**bits, (48, 96))  # (out, in)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (96 * bits // 32, 48)
    assert torch.equal(unpack_qweight(qweight, bits, 96), codes.to(torch.uint8))
    zeros = torch.randint(0, 2**bits, (64, 3))  # (out, groups)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (3, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 64), zeros.to(torch.uint8))
