rak_macros::cell! {
    cell Bad {
        dims K, V;
        input q[K], k[K], v[V];
        state S[K, V], n[K];
        update S[i, j] = S[i, j] + k[i] * v[j];
        output o[j] = sum(i) q[i] * S[i, j];
    }
}

fn main() {}
