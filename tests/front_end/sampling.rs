//! Generation's host side (`rak::runtime::generate`): sampling and prompt encoding.

use rak::runtime::data::{DataConfig, Rng};
use rak::runtime::generate::*;

#[test]
fn sampling_greedy_top_k_top_p_and_temperature() {
    let logits = [0.5f32, 3.0, 2.9, -1.0];
    let mut rng = Rng::new(1);
    assert_eq!(Sampling::greedy().draw(&logits, &mut rng), 1);
    let top2 = Sampling {
        temperature: 1.0,
        top_k: Some(2),
        top_p: None,
        seed: 0,
    };
    let draws: Vec<usize> = (0..200).map(|_| top2.draw(&logits, &mut rng)).collect();
    assert!(draws.iter().all(|&t| t == 1 || t == 2));
    assert!(draws.contains(&1) && draws.contains(&2));
    // Nucleus 0.3: the most likely token alone holds more than that.
    let nucleus = Sampling {
        top_p: Some(0.3),
        top_k: None,
        ..top2
    };
    assert!((0..50).all(|_| nucleus.draw(&logits, &mut rng) == 1));
    // A high temperature reaches every token.
    let hot = Sampling {
        temperature: 50.0,
        top_k: None,
        top_p: None,
        seed: 0,
    };
    let mut seen = [false; 4];
    for _ in 0..400 {
        seen[hot.draw(&logits, &mut rng)] = true;
    }
    assert_eq!(seen, [true; 4]);
    assert!(
        Sampling {
            top_p: Some(1.5),
            ..hot
        }
        .validate()
        .unwrap_err()
        .contains("--top-p")
    );
}

#[test]
fn prompts_are_encoded_for_the_data() {
    let recall = DataConfig::Recall {
        vocab: 16,
        pairs: 2,
    };
    assert_eq!(encode(&recall, " 3 15  0").unwrap(), [3, 15, 0]);
    assert!(encode(&recall, "3 16").unwrap_err().contains("`16`"));
    assert!(encode(&recall, "  ").unwrap_err().contains("empty"));
    let text = DataConfig::Text {
        path: "x".into(),
        seq_len: 8,
    };
    assert_eq!(encode(&text, "hé").unwrap(), [104, 195, 169]);
    assert_eq!(decode(&text, &[104, 195, 169]), "hé");
    assert_eq!(decode(&recall, &[3, 4]), "3 4 ");
}
