rak_macros::cell! {
    struct Bad {
        dims K;
    }
}

fn main() {}
