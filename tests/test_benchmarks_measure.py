"""benchmarks.measure: kernel names mapped back to ops."""

from benchmarks.measure import op_family


def test_op_family_maps_onednn_kernel_names_back():
    assert op_family("_MklNativeConv2D") == "Conv2D"
    assert op_family("_MklConv2DBackpropInput") == "Conv2DBackpropInput"
    assert op_family("_MklNativeFusedConv2D") == "Conv2D"
    assert op_family("_FusedConv2D") == "Conv2D"
    assert op_family("_MklFusedMatMul") == "MatMul"
    assert op_family("Conv2D") == "Conv2D"
    assert op_family("FusedBatchNormV3") == "FusedBatchNormV3"
    assert op_family("_Retval") == "_Retval"


def test_trimmed_rss_is_the_resident_size_after_the_heap_is_handed_back():
    from benchmarks.measure import rss_gb, trimmed_rss_gb

    blocks = [bytearray(65536) for _ in range(1000)]  # 65 MB of heap, below mmap's threshold
    for b in blocks:
        b[0] = 1
    held = rss_gb()
    del blocks, b
    trimmed = trimmed_rss_gb()
    assert 0 < trimmed <= held + 0.01  # never more than before (allocator noise: 10 MB)
