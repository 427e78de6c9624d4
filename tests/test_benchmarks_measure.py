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
