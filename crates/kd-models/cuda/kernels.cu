// The CUDA side of kd-models' own ops, on activations laid out channels-first, [c, b, h, w]
// (a pool reads planes, so any layout whose last two axes are h and w). f32 only.
//
// Every kernel writes each output element from one thread, and every sum runs in a fixed order
// (no atomics), so the same inputs give the same bits on the same GPU. The backward kernels
// gather: each input element sums the outputs that read it, in the order the CPU's scatter adds
// them (taps, then outputs, ascending).
//
// Compiled to PTX by kd-models' build.rs (`--features cuda`), loaded by src/gpu.rs.

#include <stdint.h>

struct Conv {
    int c, b, h, w, k, stride, pad, oh, ow;
};

// cols [c*k*k, b*oh*ow] from x [c, b, h, w]; zero where the tap reads the padding.
extern "C" __global__ void kd_im2col(const float *x, float *cols, Conv g) {
    const int64_t n = (int64_t)g.b * g.oh * g.ow;
    const int64_t total = (int64_t)g.c * g.k * g.k * n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t col = i % n;
        const int64_t row = i / n;
        const int kx = row % g.k;
        const int ky = (row / g.k) % g.k;
        const int ci = row / (g.k * g.k);
        const int ox = col % g.ow;
        const int oy = (col / g.ow) % g.oh;
        const int bi = col / ((int64_t)g.ow * g.oh);
        const int iy = oy * g.stride + ky - g.pad;
        const int ix = ox * g.stride + kx - g.pad;
        float v = 0.0f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) {
            v = x[(((int64_t)ci * g.b + bi) * g.h + iy) * g.w + ix];
        }
        cols[i] = v;
    }
}

// dx [c, b, h, w] from dcols [c*k*k, b*oh*ow]: each input sums the columns that read it, taps
// in order (ky, then kx), as the CPU's col2im adds them.
extern "C" __global__ void kd_col2im(const float *cols, float *dx, Conv g) {
    const int64_t n = (int64_t)g.b * g.oh * g.ow;
    const int64_t total = (int64_t)g.c * g.b * g.h * g.w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int ix = i % g.w;
        const int iy = (i / g.w) % g.h;
        const int bi = (i / ((int64_t)g.w * g.h)) % g.b;
        const int ci = i / ((int64_t)g.w * g.h * g.b);
        float acc = 0.0f;
        for (int ky = 0; ky < g.k; ++ky) {
            const int ty = iy + g.pad - ky;
            if (ty < 0 || ty % g.stride != 0) continue;
            const int oy = ty / g.stride;
            if (oy >= g.oh) continue;
            for (int kx = 0; kx < g.k; ++kx) {
                const int tx = ix + g.pad - kx;
                if (tx < 0 || tx % g.stride != 0) continue;
                const int ox = tx / g.stride;
                if (ox >= g.ow) continue;
                const int64_t row = ((int64_t)ci * g.k + ky) * g.k + kx;
                acc += cols[row * n + ((int64_t)bi * g.oh + oy) * g.ow + ox];
            }
        }
        dx[i] = acc;
    }
}

struct Pool {
    int planes, h, w, oh, ow, k, stride, pad, is_max;
};

// The window of output o along an axis of `len`: [start, end) clipped to the input, and its
// length with the padding counted (PyTorch's divisor), as Pool2d::window.
__device__ __forceinline__ void window(const Pool &p, int o, int len, int *lo, int *hi, int *with_pad) {
    const int start = o * p.stride - p.pad;
    int end = start + p.k;
    if (end > len + p.pad) end = len + p.pad;
    *with_pad = end - start;
    *lo = start < 0 ? 0 : start;
    *hi = end < len ? end : len;
}

extern "C" __global__ void kd_pool_forward(const float *x, float *y, Pool p) {
    const int64_t total = (int64_t)p.planes * p.oh * p.ow;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int ox = i % p.ow;
        const int oy = (i / p.ow) % p.oh;
        const int64_t plane = i / ((int64_t)p.ow * p.oh);
        int y0, y1, wy, x0, x1, wx;
        window(p, oy, p.h, &y0, &y1, &wy);
        window(p, ox, p.w, &x0, &x1, &wx);
        const float *src = x + plane * p.h * p.w;
        float acc = src[y0 * p.w + x0];
        bool first = true;
        for (int yy = y0; yy < y1; ++yy) {
            for (int xx = x0; xx < x1; ++xx) {
                if (first) { first = false; continue; }
                const float v = src[yy * p.w + xx];
                acc = p.is_max ? ((v > acc || isnan(v)) ? v : acc) : acc + v;  // NaN wins, as on the CPU
            }
        }
        y[i] = p.is_max ? acc : acc / (float)(wy * wx);
    }
}

// The input gradient: a max-pool output's gradient goes to the first input (row-major) of its
// window equal to the output (PyTorch's arg-max); an average's is spread over its window.
extern "C" __global__ void kd_pool_backward(const float *x, const float *y, const float *dy, float *dx,
                                            Pool p) {
    const int64_t total = (int64_t)p.planes * p.h * p.w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int ix = i % p.w;
        const int iy = (i / p.w) % p.h;
        const int64_t plane = i / ((int64_t)p.w * p.h);
        const float *src = x + plane * p.h * p.w;
        const float *out = y + plane * p.oh * p.ow;
        const float *g = dy + plane * p.oh * p.ow;
        // Outputs whose window [o*s - pad, o*s - pad + k) holds this input.
        int oy_lo = iy + p.pad - p.k + 1;
        oy_lo = oy_lo <= 0 ? 0 : (oy_lo + p.stride - 1) / p.stride;
        int oy_hi = (iy + p.pad) / p.stride;
        if (oy_hi > p.oh - 1) oy_hi = p.oh - 1;
        int ox_lo = ix + p.pad - p.k + 1;
        ox_lo = ox_lo <= 0 ? 0 : (ox_lo + p.stride - 1) / p.stride;
        int ox_hi = (ix + p.pad) / p.stride;
        if (ox_hi > p.ow - 1) ox_hi = p.ow - 1;
        float acc = 0.0f;
        for (int oy = oy_lo; oy <= oy_hi; ++oy) {
            int y0, y1, wy;
            window(p, oy, p.h, &y0, &y1, &wy);
            if (iy < y0 || iy >= y1) continue;
            for (int ox = ox_lo; ox <= ox_hi; ++ox) {
                int x0, x1, wx;
                window(p, ox, p.w, &x0, &x1, &wx);
                if (ix < x0 || ix >= x1) continue;
                const int64_t o = (int64_t)oy * p.ow + ox;
                if (!p.is_max) {
                    acc += g[o] / (float)(wy * wx);
                    continue;
                }
                // Is this input the window's first maximum?
                const float m = out[o];
                const bool nan = isnan(m);
                bool mine = false;
                for (int yy = y0; yy < y1 && !mine; ++yy) {
                    int xx = x0;
                    for (; xx < x1; ++xx) {
                        const float v = src[yy * p.w + xx];
                        if (nan ? isnan(v) : v == m) break;
                    }
                    if (xx < x1) {
                        mine = (yy == iy && xx == ix);
                        break;
                    }
                }
                if (mine) acc += g[o];
            }
        }
        dx[i] = acc;
    }
}

// A channels-first tensor's rows: c channels of n elements each.
struct Rows {
    int c, n;
};

// y = max(0, z + b[channel]) on z [c, n] (`kd_models::conv::BiasRelu`): one launch where
// candle's broadcast add, comparison, conversion and product took four.
extern "C" __global__ void kd_bias_relu(const float *z, const float *b, float *y, Rows r) {
    const long long len = (long long)r.c * r.n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = z[i] + b[i / r.n];
        y[i] = v > 0.0f ? v : 0.0f;
    }
}

// ReLU's gradient from its output: dz = dy where y > 0, else 0 (PyTorch's rule).
extern "C" __global__ void kd_relu_pass(const float *y, const float *dy, float *dz, Rows r) {
    const long long len = (long long)r.c * r.n;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        dz[i] = y[i] > 0.0f ? dy[i] : 0.0f;
    }
}

// Adam's constants for one step (`kd_models::adam::AdamStep`, `#[repr(C)]`).
struct Adam {
    float b1, b2, step_size, bc2_sqrt, eps, decay;
};

// Every variable of a model in one launch (`kd_models::adam::AdamStep::apply_all`). `table` holds
// five words per variable: the weights, the moments [m; v], the gradient (device addresses), the
// variable's first element in the concatenation of all of them, and its length; the starts
// ascend. Each element: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², then w ← w·decay −
// step_size·m / (√v / √(1 − β₂ᵗ) + ε), each operation rounded as the CPU's loop (no fused
// multiply-add): the same bits.
extern "C" __global__ void kd_adam_all(const unsigned long long *table, int count, long long total, Adam a) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int lo = 0, hi = count - 1;  // the last variable whose start is ≤ i
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if ((long long)table[5 * mid + 3] <= i) lo = mid; else hi = mid - 1;
        }
        const unsigned long long *slot = table + 5 * lo;
        float *w = (float *)slot[0];
        float *mv = (float *)slot[1];
        const float *g = (const float *)slot[2];
        const long long n = (long long)slot[4], j = i - (long long)slot[3];
        const float gj = g[j];
        const float m = __fadd_rn(__fmul_rn(a.b1, mv[j]), __fmul_rn(1.0f - a.b1, gj));
        const float v = __fadd_rn(__fmul_rn(a.b2, mv[n + j]), __fmul_rn(__fmul_rn(1.0f - a.b2, gj), gj));
        mv[j] = m;
        mv[n + j] = v;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), a.bc2_sqrt), a.eps);
        w[j] = __fsub_rn(__fmul_rn(w[j], a.decay), __fdiv_rn(__fmul_rn(a.step_size, m), denom));
    }
}

// BatchNorm + ReLU in training mode on z [c, n] (channels-first: a channel is a row), in four
// kernels instead of candle's dozens of small ops. One block per channel for the reductions,
// each thread summing a fixed stride of the row in double, then a fixed tree: the same bits on
// every run.

#define BN_THREADS 256

// Sums a double across the block; thread 0 gets the total. Fixed order.
__device__ double block_sum(double v, double *shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = BN_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();
    return total;
}

struct Norm {
    int c, n;
    float eps;
};

// stats [2c]: each channel's mean and biased variance (two passes over the row, in double).
extern "C" __global__ void kd_bn_stats(const float *z, float *stats, Norm a) {
    __shared__ double shared[BN_THREADS];
    const float *row = z + (int64_t)blockIdx.x * a.n;
    double s = 0.0;
    for (int i = threadIdx.x; i < a.n; i += BN_THREADS) s += row[i];
    const double mean = block_sum(s, shared) / a.n;
    double q = 0.0;
    for (int i = threadIdx.x; i < a.n; i += BN_THREADS) {
        const double d = row[i] - mean;
        q += d * d;
    }
    const double var = block_sum(q, shared) / a.n;
    if (threadIdx.x == 0) {
        stats[blockIdx.x] = (float)mean;
        stats[a.c + blockIdx.x] = (float)var;
    }
}

// The normalised value of z[i] in channel ch: (z − μ) / √(σ² + ε). stats [2c]: means, variances.
__device__ __forceinline__ float normalised(float z, const float *stats, int ch, const Norm &a) {
    return (z - stats[ch]) * rsqrtf(stats[a.c + ch] + a.eps);
}

// y = max(0, x̂·γ + β). gb [2c]: γ, β.
extern "C" __global__ void kd_bn_relu_forward(const float *z, const float *gb, const float *stats, float *y,
                                              Norm a) {
    const int64_t total = (int64_t)a.c * a.n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int ch = i / a.n;
        const float v = normalised(z[i], stats, ch, a) * gb[ch] + gb[a.c + ch];
        y[i] = v > 0.0f ? v : 0.0f;
    }
}

// The backward's sums per channel over the elements the ReLU passed (x̂·γ + β > 0):
// sums[ch] = Σ dy·x̂ (dγ), sums[c + ch] = Σ dy (dβ).
extern "C" __global__ void kd_bn_relu_sums(const float *z, const float *dy, const float *gb, const float *stats,
                                           float *sums, Norm a) {
    __shared__ double shared[BN_THREADS];
    const int ch = blockIdx.x;
    const float *zr = z + (int64_t)ch * a.n;
    const float *gr = dy + (int64_t)ch * a.n;
    double sg = 0.0, sgx = 0.0;
    for (int i = threadIdx.x; i < a.n; i += BN_THREADS) {
        const float x = normalised(zr[i], stats, ch, a);
        if (x * gb[ch] + gb[a.c + ch] > 0.0f) {
            sg += gr[i];
            sgx += (double)gr[i] * x;
        }
    }
    const double dgamma = block_sum(sgx, shared);
    const double dbeta = block_sum(sg, shared);
    if (threadIdx.x == 0) {
        sums[ch] = (float)dgamma;
        sums[a.c + ch] = (float)dbeta;
    }
}

// dz = γ/σ · (g − Σg/n − x̂·Σg·x̂/n), g = dy where the ReLU passed.
extern "C" __global__ void kd_bn_relu_dz(const float *z, const float *dy, const float *gb, const float *stats,
                                         const float *sums, float *dz, Norm a) {
    const int64_t total = (int64_t)a.c * a.n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int ch = i / a.n;
        const float x = normalised(z[i], stats, ch, a);
        const float g = x * gb[ch] + gb[a.c + ch] > 0.0f ? dy[i] : 0.0f;
        const float k = gb[ch] * rsqrtf(stats[a.c + ch] + a.eps);
        dz[i] = k * (g - sums[a.c + ch] / a.n - x * sums[ch] / a.n);
    }
}

// BatchNorm's running statistics moved towards the batch's, in place, one launch for both
// (`kd_models::norm`, where candle's ops took nine): r ← r·keep + batch·momentum, the
// variance's batch value first made unbiased. Each operation rounded as candle's ops round
// them.
struct Running {
    int c;
    float keep, momentum, unbiased;
};

extern "C" __global__ void kd_bn_running(float *running_mean, float *running_var, const float *mean,
                                         const float *var, Running a) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < a.c; i += gridDim.x * blockDim.x) {
        running_mean[i] = __fadd_rn(__fmul_rn(running_mean[i], a.keep), __fmul_rn(mean[i], a.momentum));
        const float batch_var = __fmul_rn(var[i], a.unbiased);
        running_var[i] = __fadd_rn(__fmul_rn(running_var[i], a.keep), __fmul_rn(batch_var, a.momentum));
    }
}
