rak_macros::cell! {
    cell Bad {
        dims K, V;
        input k[K], v[V];
        state S[K, V];
        update S[i, j] = S[i, j] + k[i] * v[j];
        output o = 1.0;
    }
}

fn main() {}
