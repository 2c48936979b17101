//! Shape expressions of the mapping tables: sums of `n`, `sym` and `n*sym` terms, and the symbol
//! bindings that the engine learns from a checkpoint's tensors.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// Symbol values bound so far (channel widths, vocabulary size, layer count, ...).
pub type Symbols = BTreeMap<String, usize>;

/// One term of a sum: `coef` or `coef * symbol`.
#[derive(Clone, Debug, PartialEq)]
struct Term {
    coef: usize,
    symbol: Option<String>,
}

/// A linear expression over symbols, e.g. `c3+c2` or `4*c0`.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    terms: Vec<Term>,
}

impl Expr {
    pub fn parse(text: &str) -> Result<Expr> {
        let mut terms = Vec::new();
        for raw in text.split('+') {
            let raw = raw.trim();
            let (coef, symbol) = match raw.split_once('*') {
                Some((n, s)) => (parse_coef(n)?, Some(parse_symbol(s)?)),
                None if raw.chars().all(|c| c.is_ascii_digit()) && !raw.is_empty() => (parse_coef(raw)?, None),
                None => (1, Some(parse_symbol(raw)?)),
            };
            terms.push(Term { coef, symbol });
        }
        Ok(Expr { terms })
    }

    /// Replaces each symbol by an expression (template parameters -> model symbols).
    pub fn substitute(&self, params: &BTreeMap<String, Expr>) -> Result<Expr> {
        let mut terms = Vec::new();
        for term in &self.terms {
            match &term.symbol {
                None => terms.push(term.clone()),
                Some(name) => {
                    let inner = params.get(name).with_context(|| format!("template parameter `{name}` is not given"))?;
                    for t in &inner.terms {
                        terms.push(Term { coef: t.coef * term.coef, symbol: t.symbol.clone() });
                    }
                }
            }
        }
        Ok(Expr { terms })
    }

    /// The expression multiplied by `n` (a tensor fused from `n` equal parts).
    pub fn times(&self, n: usize) -> Expr {
        Expr { terms: self.terms.iter().map(|t| Term { coef: t.coef * n, symbol: t.symbol.clone() }).collect() }
    }

    /// The value, if every symbol is bound.
    pub fn eval(&self, symbols: &Symbols) -> Option<usize> {
        self.terms.iter().try_fold(0usize, |acc, t| match &t.symbol {
            None => Some(acc + t.coef),
            Some(s) => symbols.get(s).map(|v| acc + t.coef * v),
        })
    }

    /// Binds the expression's one unbound symbol (if any) so that it equals `value`, then checks.
    /// Returns false when the expression cannot equal `value` under the current bindings.
    pub fn unify(&self, value: usize, symbols: &mut Symbols) -> bool {
        let unbound: Vec<&Term> = self
            .terms
            .iter()
            .filter(|t| t.symbol.as_ref().is_some_and(|s| !symbols.contains_key(s)))
            .collect();
        let first = match unbound.first() {
            Some(t) => t.symbol.clone().expect("filtered on symbol"),
            None => return self.eval(symbols) == Some(value),
        };
        if unbound.iter().any(|t| t.symbol.as_deref() != Some(&first)) {
            return false; // two different unknowns: this tensor cannot decide them
        }
        let coef: usize = unbound.iter().map(|t| t.coef).sum();
        let known: usize = self
            .terms
            .iter()
            .filter(|t| t.symbol.as_deref() != Some(&first))
            .map(|t| t.coef * t.symbol.as_ref().map_or(1, |s| symbols[s]))
            .sum();
        if value <= known || (value - known) % coef != 0 {
            return false;
        }
        symbols.insert(first, (value - known) / coef);
        true
    }
}

impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| match (&t.symbol, t.coef) {
                (None, c) => c.to_string(),
                (Some(s), 1) => s.clone(),
                (Some(s), c) => format!("{c}*{s}"),
            })
            .collect();
        write!(f, "{}", parts.join("+"))
    }
}

/// Parses `a=expr, b=expr` parameter lists of the model tables.
pub fn parse_params(text: &str) -> Result<BTreeMap<String, Expr>> {
    let mut params = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item.split_once('=').with_context(|| format!("parameter `{item}` has no `=`"))?;
        params.insert(name.trim().to_string(), Expr::parse(value)?);
    }
    Ok(params)
}

/// Parses a comma-separated shape such as `cout, cin, 3, 3`.
pub fn parse_shape(text: &str) -> Result<Vec<Expr>> {
    text.split(',').map(|d| Expr::parse(d.trim())).collect()
}

fn parse_coef(text: &str) -> Result<usize> {
    text.trim().parse().with_context(|| format!("`{text}` is not a whole number"))
}

fn parse_symbol(text: &str) -> Result<String> {
    let text = text.trim();
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || text.starts_with(|c: char| c.is_ascii_digit()) {
        bail!("`{text}` is not a symbol name");
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_scaled_symbol_then_checks_sums() {
        let mut syms = Symbols::new();
        assert!(Expr::parse("4*c0").unwrap().unify(1280, &mut syms));
        assert_eq!(syms["c0"], 320);
        assert!(Expr::parse("c0+c0").unwrap().unify(640, &mut syms));
        assert!(!Expr::parse("c0+c0").unwrap().unify(641, &mut syms));
        assert!(Expr::parse("c0+c1").unwrap().unify(960, &mut syms));
        assert_eq!(syms["c1"], 640);
    }

    #[test]
    fn refuses_values_that_do_not_divide() {
        let mut syms = Symbols::new();
        assert!(!Expr::parse("8*c").unwrap().unify(12, &mut syms));
        assert!(syms.is_empty());
        assert!(!Expr::parse("a+b").unwrap().unify(12, &mut syms));
    }

    #[test]
    fn substitutes_parameters() {
        let params = parse_params("c=c3+c2, k=3").unwrap();
        let e = Expr::parse("2*c").unwrap().substitute(&params).unwrap();
        assert_eq!(e.to_string(), "2*c3+2*c2");
        let shape = parse_shape("c, c, k, k").unwrap();
        assert_eq!(shape.len(), 4);
        assert!(Expr::parse("3x").is_err());
        assert!(Expr::parse("a b").is_err());
    }
}
