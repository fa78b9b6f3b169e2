"""Pure quantization math: quant-dequant per dtype and bit-packing."""
