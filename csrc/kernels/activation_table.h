// The activations a fused stage can end in: one row each. A row and the
// activation's math (one ActivationMath<A> specialization in
// activation_math.h) are all there is of an activation: the C++ enum and the
// spec codes, the Python enum (seqfuse.spec.Activation, read from
// seqfuse._C.vocabulary()), the training walk's choice of what to save, the
// switches of the CPU inference, training and CUDA kernels, and conv engine
// 2's ATen op are all made from them.
//
//   X(Name, id, PYTHON_NAME, from_output, piecewise, registers, aten)
//
// id: the value in a spec (stable: specs are part of the op schema's data;
//   append rows, never renumber).
// from_output: the derivative is a function of the activation's output (the
//   training forward saves the output only, and ActivationMath<A>::grad reads
//   it); the others save the pre-activation, or recompute it. The backward
//   reads the output's values for every such row but None
//   (derivative_reads_output).
// piecewise: a compare and a multiply or two, no exp/erf/tanh: the training
//   epilogue applies it in its scale/shift loop over NCHW planes (vectorized
//   by the compiler with blends).
// registers: where the CPU GEMM kernels apply it: Always in the accumulator
//   registers; Float in them in float (in double by the row pass); Never in
//   the row pass, one pass over the finished, cache-hot rows (activate_row):
//   long polynomials (GELU, Tanh) would bloat every micro-tile.
// aten: conv engine 2's ATen in-place op, SEQFUSE_ATEN(op, args...) for
//   at::op(t, args...) (expanded in csrc/adapters/cpu/conv_cpu.cpp only: this header
//   stays torch-free); SEQFUSE_NO_ATEN where the fused epilogue applies it.
#pragma once

#include <cstdint>

// clang-format off
#define SEQFUSE_ACTIVATION_TABLE(X)                                                        \
  X(None,         0, "NONE",        true,  true,  Never,  SEQFUSE_NO_ATEN)                 \
  X(ReLU,         1, "RELU",        true,  true,  Always, SEQFUSE_NO_ATEN)                 \
  X(LeakyReLU,    2, "LEAKY_RELU",  false, true,  Float,  SEQFUSE_NO_ATEN)                 \
  X(ReLU6,        3, "RELU6",       false, true,  Always, SEQFUSE_NO_ATEN)                 \
  X(Sigmoid,      4, "SIGMOID",     true,  false, Float,  SEQFUSE_ATEN(sigmoid_))          \
  X(Tanh,         5, "TANH",        true,  false, Never,  SEQFUSE_ATEN(tanh_))             \
  X(GeluErf,      6, "GELU_ERF",    false, false, Never,  SEQFUSE_ATEN(gelu_, "none"))     \
  X(GeluTanh,     7, "GELU_TANH",   false, false, Never,  SEQFUSE_ATEN(gelu_, "tanh"))     \
  X(SiLU,         8, "SILU",        false, false, Float,  SEQFUSE_ATEN(silu_))             \
  X(Hardswish,    9, "HARDSWISH",   false, true,  Float,  SEQFUSE_NO_ATEN)                 \
  X(Hardsigmoid, 10, "HARDSIGMOID", false, true,  Float,  SEQFUSE_NO_ATEN)                 \
  X(Mish,        11, "MISH",        false, false, Float,  SEQFUSE_ATEN(mish_))
// clang-format on

namespace seqfuse::kernels {

enum class Activation : int64_t {
#define SEQFUSE_ACTIVATION_ENUM(name, id, ...) name = id,
  SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_ENUM)
#undef SEQFUSE_ACTIVATION_ENUM
};

#define SEQFUSE_ACTIVATION_COUNT(...) +1
constexpr int64_t kNumActivations = 0 SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_COUNT);
#undef SEQFUSE_ACTIVATION_COUNT

// The spec decoders accept codes [0, kNumActivations): the ids must be the rows' positions.
constexpr bool activation_ids_are_positions() {
  int64_t position = 0;
  bool dense = true;
#define SEQFUSE_ACTIVATION_POSITION(name, id, ...) dense = dense && (id) == position++;
  SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_POSITION)
#undef SEQFUSE_ACTIVATION_POSITION
  return dense;
}
static_assert(activation_ids_are_positions(), "activation ids must be 0, 1, 2, ... in row order");

// The `registers` column.
enum class RegisterUse { Never, Float, Always };

// The columns as functions of an activation (constexpr: the kernels' switches
// fold them; usable in device code).
constexpr bool derivative_from_output(Activation a) {
  switch (a) {
#define SEQFUSE_ACTIVATION_FROM_OUTPUT(name, id, python_name, from_output, ...) \
  case Activation::name: return from_output;
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_FROM_OUTPUT)
#undef SEQFUSE_ACTIVATION_FROM_OUTPUT
  }
  return false;
}

// The activations whose backward reads the output's values (None reads only
// its layout): a caller may not modify such an output in place before the
// backward, as with eager's ReLU, Sigmoid and Tanh.
constexpr bool derivative_reads_output(Activation a) {
  return a != Activation::None && derivative_from_output(a);
}

constexpr bool is_piecewise(Activation a) {
  switch (a) {
#define SEQFUSE_ACTIVATION_PIECEWISE(name, id, python_name, from_output, piecewise, ...) \
  case Activation::name: return piecewise;
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_PIECEWISE)
#undef SEQFUSE_ACTIVATION_PIECEWISE
  }
  return false;
}

constexpr RegisterUse register_use(Activation a) {
  switch (a) {
#define SEQFUSE_ACTIVATION_REGISTERS(name, id, python_name, from_output, piecewise, registers, ...) \
  case Activation::name: return RegisterUse::registers;
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_REGISTERS)
#undef SEQFUSE_ACTIVATION_REGISTERS
  }
  return RegisterUse::Never;
}

}  // namespace seqfuse::kernels
