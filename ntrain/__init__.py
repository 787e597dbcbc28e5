"""ntrain's public Python namespace.

    ntrain.client   the Python client of the training service (no TensorFlow)
    ntrain.v1       the generated protobuf and gRPC code of the contract,
                    proto/ntrain/v1/training.proto

In the distribution `ntrain.v1` is installed from proto/ntrain/v1 (setuptools
`package-dir`), where it is generated and committed beside its .proto file.
"""
