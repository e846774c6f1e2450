"""Triton kernels for CUDA devices, one module per op, each beside the plain-torch reference it must match.

The references (`<op>_reference`) define the semantics and are what the tests compare against; the
tests run the kernels on CPUs under the Triton interpreter (`TRITON_INTERPRET=1`). Modules import
`triton` themselves, so importing this package alone never requires it.
"""
