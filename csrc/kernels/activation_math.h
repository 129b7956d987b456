// The math of every activation of activation_table.h, written once: one
// ActivationMath<A> specialization per row, compiled in each context that
// runs activations:
//
//   the CPU kernels   activations.h, inside each ISA namespace: float and
//                     double scalars, the ISA's float vector registers, and
//                     double vectors for the rows in registers Always;
//   the CUDA kernels  cuda/activation.cuh: float and double, on the device
//                     (nvcc) and on host threads (the C++ tests' SIMT emulation).
//
// Each specialization has
//   forward(x, alpha)  act(x), generic over V: a scalar T or a vector of T
//                      (alpha is a T: LeakyReLU's negative slope, else unused);
//   grad(g, v, alpha)  g * act'(.), v being the output for the rows with
//                      from_output, the pre-activation for the others; scalars.
//   vec(x, alpha)      optional: the CPU's float vector form where forward
//                      cannot serve vectors (Mish: there is no vector log1p).
// The formulas, their behaviour at the kinks, for NaN and +-inf are eager's
// (ATen's CPU kernels and their *_backward formulas): comparisons are written
// so that NaN falls through them.
//
// The including context defines, for every type it instantiates with:
//   SEQFUSE_ACTIVATION_FN      the functions' qualifiers (inline; __host__ __device__)
//   exp_, tanh_, erf_, log1p_  (scalars; exp_, tanh_, erf_ on the CPU's float vectors)
//   where(mask, a, b)          a where mask holds, else b (a, b vectors or scalars of T)
//   infinity<T>(), quiet_nan<T>()
//   gelu_erf_pos_inf(T)        GELU (erf)'s value at +inf: eager's (see mlp_spec.h)
// and `Activation`. No include guard: included once in each context's namespace.

template <Activation A> struct ActivationMath;

template <> struct ActivationMath<Activation::None> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) { return x; }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T, T) { return g; }
};

template <> struct ActivationMath<Activation::ReLU> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) { return where(x < T(0), T(0), x); }
  // threshold_backward: a NaN output passes the gradient.
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T y, T) { return y <= T(0) ? T(0) : g; }
};

template <> struct ActivationMath<Activation::LeakyReLU> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T slope) {
    return where(x > T(0), x, x * slope);
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T slope) { return x > T(0) ? g : g * slope; }
};

template <> struct ActivationMath<Activation::ReLU6> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    return where(x < T(0), T(0), where(x > T(6), T(6), x));
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    return (x <= T(0) || x >= T(6)) ? T(0) : g;
  }
};

template <> struct ActivationMath<Activation::Sigmoid> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    return T(1) / (T(1) + exp_(-x));
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T y, T) { return g * (T(1) - y) * y; }
};

template <> struct ActivationMath<Activation::Tanh> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) { return tanh_(x); }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T y, T) { return g * (T(1) - y * y); }
};

template <> struct ActivationMath<Activation::GeluErf> {
  // +inf gives eager's value (its CPU kernels differ, see mlp_spec.h) and
  // -inf gives NaN (-inf * 0), pinned so that no rounding of erf near the
  // limits changes either.
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    const V y = T(0.5) * x * (T(1) + erf_(x * T(0.70710678118654752440)));
    return where(x == infinity<T>(), gelu_erf_pos_inf(T(0)), where(x == -infinity<T>(), quiet_nan<T>(), y));
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    const T k_alpha = T(0.70710678118654752440);
    const T k_beta = T(1.12837916709551257390 * 0.70710678118654752440 * 0.5);
    const T cdf = T(0.5) * (T(1) + erf_(x * k_alpha));
    const T pdf = k_beta * exp_(T(-0.5) * x * x);
    return g * (cdf + x * pdf);
  }
};

template <> struct ActivationMath<Activation::GeluTanh> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    const V inner = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + tanh_(inner));
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    const T k_beta = T(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
    const T k_kappa = T(0.044715);
    const T x2 = x * x;
    const T inner = k_beta * (x + k_kappa * x2 * x);
    const T t = tanh_(inner);
    const T left_derivative = T(0.5) * (T(1) + t);
    const T right_derivative = T(0.5) * x * (T(1) - t * t) * k_beta * (T(1) + T(3) * k_kappa * x2);
    return g * (left_derivative + right_derivative);
  }
};

template <> struct ActivationMath<Activation::SiLU> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) { return x / (T(1) + exp_(-x)); }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    const T s = T(1) / (T(1) + exp_(-x));
    return g * s * (T(1) + x * (T(1) - s));
  }
};

template <> struct ActivationMath<Activation::Hardswish> {
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    const V t = x + T(3);
    return x * where(t < T(0), T(0), where(t > T(6), T(6), t)) / T(6);
  }
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    return x < T(-3) ? T(0) : x <= T(3) ? g * (x / T(3) + T(0.5)) : g;
  }
};

template <> struct ActivationMath<Activation::Hardsigmoid> {
  // As ATen: min(max(x + 3, 0), 6) / 6.
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    const V t = x + T(3);
    return where(t < T(0), T(0), where(t > T(6), T(6), t)) / T(6);
  }
  // hardsigmoid_backward's open interval, and its slope 1/6 rounded to float
  // even for double (eager's values).
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    return (x > T(-3) && x < T(3)) ? g * T(1.0f / 6.0f) : T(0);
  }
};

template <> struct ActivationMath<Activation::Mish> {
  // x * tanh(softplus(x)) as ATen writes it (no softplus threshold): NaN at
  // -inf (-inf * 0), x at +inf.
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V forward(V x, T) {
    return x * tanh_(log1p_(exp_(x)));
  }
  // The float vectors: tanh(log(1 + e)) = n / (n + 2) with n = e (e + 2), one
  // exp and a division, without cancellation for any x; beyond 20 the factor
  // is 1 in float (and n would overflow from 44 on).
  template <typename V, typename T> static SEQFUSE_ACTIVATION_FN V vec(V x, T) {
    const V e = exp_(x);
    const V n = e * (e + T(2));
    return where(x > T(20), x, x * (n / (n + T(2))));
  }
  // mish_backward: g * (tanh(softplus(x)) + x * sigmoid(x) * (1 - tanh(softplus(x))^2)).
  template <typename T> static SEQFUSE_ACTIVATION_FN T grad(T g, T x, T) {
    const T sigmoid = T(1) / (T(1) + exp_(-x));
    const T tanh_softplus = tanh_(log1p_(exp_(x)));
    return g * (tanh_softplus + x * sigmoid * (T(1) - tanh_softplus * tanh_softplus));
  }
};

// act(x) and g * act'(v) for an activation chosen at run time, one case per row.
template <typename T> SEQFUSE_ACTIVATION_FN T activate(T x, Activation act, T alpha) {
  switch (act) {
#define SEQFUSE_ACTIVATION_FORWARD_CASE(name, ...) \
  case Activation::name: return ActivationMath<Activation::name>::forward(x, alpha);
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_FORWARD_CASE)
#undef SEQFUSE_ACTIVATION_FORWARD_CASE
  }
  return x;
}

template <typename T> SEQFUSE_ACTIVATION_FN T activation_grad(T g, T v, Activation act, T alpha) {
  switch (act) {
#define SEQFUSE_ACTIVATION_GRAD_CASE(name, ...) \
  case Activation::name: return ActivationMath<Activation::name>::grad(g, v, alpha);
    SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_GRAD_CASE)
#undef SEQFUSE_ACTIVATION_GRAD_CASE
  }
  return g;
}
