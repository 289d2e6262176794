//! The compiled rule index: first match without scanning every rule.
//!
//! Each rule gets a key of four parts — service, argument, source, target —
//! each either *specific* (an interned string the request must equal: a
//! service name, a `+argument`, a qube name or one of the exact keywords
//! `@adminvm` (for the admin VM in any of its three forms), `@default`,
//! `@dispvm`) or *generic* (`*`, `@anyvm`, `@tag:`,
//! `@type:`, `@dispvm:…`, `uuid:`: decided by evaluating the token). Rules
//! with equal keys share one list, in policy order.
//!
//! A request can only match rules whose every specific part equals the
//! request's value, so its candidates are the union of at most 2⁴ = 16
//! lists (each part specific-to-the-request or generic). Those lists are
//! sorted by rule number; walking them merged in ascending order and
//! returning the first rule that fully matches gives exactly the result of
//! a linear scan — the property test in `tests/` checks this on random
//! policies. This module never changes what matches, only how fast it is
//! found.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::rule::Rule;
use crate::token::{IntendedTarget, Source, Token};

/// A small, fast, non-cryptographic hasher (the "Fx" hash of rustc). The
/// keys are policy strings and rule keys, chosen by the administrator, not
/// by a peer, so hash flooding is not a concern here.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            for (dst, src) in word.iter_mut().zip(rest) {
                *dst = *src;
            }
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// Id 0 means "generic" in a key.
const GENERIC: u32 = 0;

/// Rule lists by `[service, argument, source, target]` key.
#[derive(Debug, Default, Clone)]
pub struct RuleIndex {
    strings: HashMap<Box<str>, u32, FxBuild>,
    buckets: HashMap<[u32; 4], Vec<u32>, FxBuild>,
    /// The same rules keyed without the target, for `ask` choices.
    but_target: HashMap<[u32; 3], Vec<u32>, FxBuild>,
}

fn source_key(token: &Token) -> Option<&str> {
    match token {
        Token::Name(n) => Some(n),
        Token::AdminVm(_) => Some("@adminvm"),
        _ => None,
    }
}

fn target_key(token: &Token) -> Option<&str> {
    match token {
        Token::Name(n) => Some(n),
        Token::AdminVm(_) => Some("@adminvm"),
        Token::Default => Some("@default"),
        Token::DispVm => Some("@dispvm"),
        _ => None,
    }
}

impl RuleIndex {
    fn intern(&mut self, s: Option<&str>) -> u32 {
        let Some(s) = s else { return GENERIC };
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = u32::try_from(self.strings.len() + 1).unwrap_or(u32::MAX);
        self.strings.insert(s.into(), id);
        id
    }

    /// Compile `rules` (at most `u32::MAX` of them).
    pub fn build(rules: &[Rule]) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (number, rule) in rules.iter().enumerate() {
            let key = [
                index.intern(rule.service.as_deref()),
                index.intern(rule.argument.as_deref()),
                index.intern(source_key(&rule.source)),
                index.intern(target_key(&rule.target)),
            ];
            let number = u32::try_from(number).unwrap_or(u32::MAX);
            index.buckets.entry(key).or_default().push(number);
            index
                .but_target
                .entry([key[0], key[1], key[2]])
                .or_default()
                .push(number);
        }
        index
    }

    #[inline]
    fn id(&self, s: &str) -> Option<u32> {
        self.strings.get(s).copied()
    }

    /// Visit candidate rule numbers in ascending order until `accept`
    /// returns true; returns that rule number.
    pub fn first_match(
        &self,
        service: &str,
        argument: &str,
        source: &Source<'_>,
        target: &IntendedTarget,
        mut accept: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let source_text = if source.is_admin {
            "@adminvm"
        } else {
            source.name
        };
        let target_text: Option<&str> = match target {
            IntendedTarget::Name { name, .. } => Some(name),
            IntendedTarget::AdminVm(_) => Some("@adminvm"),
            IntendedTarget::Default => Some("@default"),
            IntendedTarget::DispVm => Some("@dispvm"),
            IntendedTarget::DispVmTemplate { .. } => None,
        };
        let dims = [
            self.id(service),
            self.id(argument),
            self.id(source_text),
            target_text.and_then(|t| self.id(t)),
        ];
        let mut lists: [&[u32]; 16] = [&[]; 16];
        let mut count = 0;
        for combo in 0u32..16 {
            let mut key = [GENERIC; 4];
            let mut possible = true;
            for (d, (slot, dim)) in key.iter_mut().zip(dims).enumerate() {
                if combo & (1 << d) != 0 {
                    match dim {
                        Some(id) => *slot = id,
                        None => {
                            possible = false;
                            break;
                        }
                    }
                }
            }
            if !possible {
                continue;
            }
            if let Some(list) = self.buckets.get(&key)
                && let Some(slot) = lists.get_mut(count)
            {
                *slot = list;
                count += 1;
            }
        }
        let lists = lists.get_mut(..count).unwrap_or_default();
        loop {
            let mut best: Option<(usize, u32)> = None;
            for (i, list) in lists.iter().enumerate() {
                if let Some(&head) = list.first()
                    && best.is_none_or(|(_, b)| head < b)
                {
                    best = Some((i, head));
                }
            }
            let (i, number) = best?;
            if let Some(list) = lists.get_mut(i) {
                *list = list.get(1..).unwrap_or_default();
            }
            let number = number as usize;
            if accept(number) {
                return Some(number);
            }
        }
    }

    /// Every rule number whose service, argument and source parts could
    /// match (the target is not looked at), ascending. Callers still check
    /// each rule; this only skips rules that cannot match.
    pub fn candidates_but_target(
        &self,
        service: &str,
        argument: &str,
        source: &Source<'_>,
    ) -> Vec<usize> {
        let source_text = if source.is_admin {
            "@adminvm"
        } else {
            source.name
        };
        let dims = [self.id(service), self.id(argument), self.id(source_text)];
        let mut out: Vec<usize> = Vec::new();
        for combo in 0u32..8 {
            let mut key = [GENERIC; 3];
            let mut possible = true;
            for (d, (slot, dim)) in key.iter_mut().zip(dims).enumerate() {
                if combo & (1 << d) != 0 {
                    match dim {
                        Some(id) => *slot = id,
                        None => {
                            possible = false;
                            break;
                        }
                    }
                }
            }
            if possible && let Some(list) = self.but_target.get(&key) {
                out.extend(list.iter().map(|&n| n as usize));
            }
        }
        out.sort_unstable();
        out
    }

    /// Number of distinct keys (for diagnostics).
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }
}
