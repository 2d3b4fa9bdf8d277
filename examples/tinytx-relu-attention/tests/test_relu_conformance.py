"""A plugin author's own test: run tinytx's conformance kit on the variant.

python -m pytest examples/tinytx-relu-attention/tests
"""

import pytest

import tinytx
from tinytx.testing import check_attention

BACKENDS = [name for name, status in tinytx.available_backends().items() if status.available]


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_passes_the_conformance_kit(backend):
    report = check_attention("relu", backend, max_examples=20)
    report.assert_passed()
    assert report["causal_no_leak"].status == "passed"
    assert report["padding_invariance"].status == "passed"
    assert report["backward"].status == "passed"  # its backward against finite differences
