// A matrix product in plain JavaScript, blocked 4 rows x 4 columns in registers (sums in
// float64, JS numbers): about 4x the naive triple loop, which is what the stock cpu kernels and
// a direct convolution loop run at. The cpu convolutions of kernels.js are im2col + this.

/**
 * C[M, N] (+)= A[M, K] @ B[K, N], all row-major Float32Arrays (views are fine).
 * @param {boolean} accumulate add into C instead of overwriting it
 */
export function gemm(A, B, C, M, K, N, accumulate = false) {
  const M4 = M - (M % 4);
  const N4 = N - (N % 4);
  for (let i = 0; i < M4; i += 4) {
    const x0 = i * K;
    const x1 = x0 + K;
    const x2 = x1 + K;
    const x3 = x2 + K;
    for (let j = 0; j < N4; j += 4) {
      let a00 = 0; let a01 = 0; let a02 = 0; let a03 = 0;
      let a10 = 0; let a11 = 0; let a12 = 0; let a13 = 0;
      let a20 = 0; let a21 = 0; let a22 = 0; let a23 = 0;
      let a30 = 0; let a31 = 0; let a32 = 0; let a33 = 0;
      for (let k = 0, o = j; k < K; k += 1, o += N) {
        const w0 = B[o]; const w1 = B[o + 1]; const w2 = B[o + 2]; const w3 = B[o + 3];
        const v0 = A[x0 + k]; const v1 = A[x1 + k]; const v2 = A[x2 + k]; const v3 = A[x3 + k];
        a00 += v0 * w0; a01 += v0 * w1; a02 += v0 * w2; a03 += v0 * w3;
        a10 += v1 * w0; a11 += v1 * w1; a12 += v1 * w2; a13 += v1 * w3;
        a20 += v2 * w0; a21 += v2 * w1; a22 += v2 * w2; a23 += v2 * w3;
        a30 += v3 * w0; a31 += v3 * w1; a32 += v3 * w2; a33 += v3 * w3;
      }
      let o = i * N + j;
      if (accumulate) {
        C[o] += a00; C[o + 1] += a01; C[o + 2] += a02; C[o + 3] += a03; o += N;
        C[o] += a10; C[o + 1] += a11; C[o + 2] += a12; C[o + 3] += a13; o += N;
        C[o] += a20; C[o + 1] += a21; C[o + 2] += a22; C[o + 3] += a23; o += N;
        C[o] += a30; C[o + 1] += a31; C[o + 2] += a32; C[o + 3] += a33;
      } else {
        C[o] = a00; C[o + 1] = a01; C[o + 2] = a02; C[o + 3] = a03; o += N;
        C[o] = a10; C[o + 1] = a11; C[o + 2] = a12; C[o + 3] = a13; o += N;
        C[o] = a20; C[o + 1] = a21; C[o + 2] = a22; C[o + 3] = a23; o += N;
        C[o] = a30; C[o + 1] = a31; C[o + 2] = a32; C[o + 3] = a33;
      }
    }
    for (let j = N4; j < N; j += 1) { // the last columns
      for (let r = i; r < i + 4; r += 1) {
        let sum = 0;
        for (let k = 0; k < K; k += 1) sum += A[r * K + k] * B[k * N + j];
        C[r * N + j] = accumulate ? C[r * N + j] + sum : sum;
      }
    }
  }
  for (let i = M4; i < M; i += 1) { // the last rows
    for (let j = 0; j < N; j += 1) {
      let sum = 0;
      for (let k = 0; k < K; k += 1) sum += A[i * K + k] * B[k * N + j];
      C[i * N + j] = accumulate ? C[i * N + j] + sum : sum;
    }
  }
  return C;
}

/** The transpose of a row-major [rows, cols] matrix, as a new Float32Array [cols, rows]. */
export function transpose(A, rows, cols) {
  const T = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r += 1) {
    const base = r * cols;
    for (let c = 0; c < cols; c += 1) T[c * rows + r] = A[base + c];
  }
  return T;
}
