//! Prompts to CLIP token ids as diffusers' pipelines and train scripts tokenize them:
//! `<|startoftext|>`, the BPE tokens (truncated), `<|endoftext|>`, then `<|endoftext|>` padding
//! to 77 (the SD1 tokenizer's and KerasCV's pad token).

use instant_clip_tokenizer::Tokenizer;

pub const MAX_LENGTH: usize = 77;

pub struct PromptTokenizer {
    bpe: Tokenizer,
}

impl Default for PromptTokenizer {
    fn default() -> Self {
        PromptTokenizer { bpe: Tokenizer::new() }
    }
}

impl PromptTokenizer {
    pub fn ids(&self, prompt: &str) -> Vec<u32> {
        let mut tokens = Vec::new();
        self.bpe.encode(prompt, &mut tokens);
        let (bos, eos) = (self.bpe.start_of_text().to_u16() as u32, self.bpe.end_of_text().to_u16() as u32);
        let mut ids = vec![bos];
        ids.extend(tokens.iter().take(MAX_LENGTH - 2).map(|t| t.to_u16() as u32));
        ids.push(eos);
        ids.resize(MAX_LENGTH, eos);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_sd1_tokenizer_layout() {
        let ids = PromptTokenizer::default().ids("a photo of sks dog");
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 48136, 1929, 49407]);
        assert_eq!(ids.len(), 77);
        assert!(ids[7..].iter().all(|i| *i == 49407));
        let long = PromptTokenizer::default().ids(&"dog ".repeat(200));
        assert_eq!((long.len(), long[76]), (77, 49407));
    }
}
