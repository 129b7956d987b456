// The activations a fused stage can end in: one row each, the one list that
// the C++ enum, the Python enum (seqfuse.spec.Activation, read from
// seqfuse._C.vocabulary()) and the training walk's choice of what to save
// are made from.
//
//   X(Enum, id, PYTHON_NAME, derivative_from_output)
//
// id: the value in a spec (stable: specs are part of the op schema's data).
// derivative_from_output: the derivative is a function of the activation's
// output (the training forward saves the output only; the others save the
// pre-activation, or recompute it).
#pragma once

#define SEQFUSE_ACTIVATION_TABLE(X)          \
  X(None, 0, "NONE", true)                  \
  X(ReLU, 1, "RELU", true)                  \
  X(LeakyReLU, 2, "LEAKY_RELU", false)      \
  X(ReLU6, 3, "RELU6", false)               \
  X(Sigmoid, 4, "SIGMOID", true)            \
  X(Tanh, 5, "TANH", true)                  \
  X(GeluErf, 6, "GELU_ERF", false)          \
  X(GeluTanh, 7, "GELU_TANH", false)        \
  X(SiLU, 8, "SILU", false)                 \
  X(Hardswish, 9, "HARDSWISH", false)       \
  X(Hardsigmoid, 10, "HARDSIGMOID", false)
