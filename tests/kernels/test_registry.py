"""kernels/registry.py: the sources as NVRTC gets them."""

from kernels.registry import load_source


def test_load_source_inlines_the_common_header_once():
    source = load_source("paged_attention")
    assert "#include" not in source
    assert source.count("struct f16 {") == 1
    assert 'extern "C" __global__' in source
