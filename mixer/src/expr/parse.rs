//! The syntax of Istio 1.1's expression language, a small subset of Go's:
//! attribute names (`request.headers`), map indexing (`m["key"]`), `!`,
//! `==`, `!=`, `&&`, `||`, the default operator `|`, string, integer,
//! floating point and boolean literals, function calls (`match(a, "x*")`)
//! and receiver calls (`a.startsWith("x")`). Precedence is Go's: `||`, then
//! `&&`, then `==` and `!=`, then `|`, then `!`.

use super::{Expr, Op};
use mixer_client::attributes::Value;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Punct(&'static str),
}

fn lex(text: &str) -> Result<Vec<(usize, Token)>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((start, Token::Ident(chars[start..i].iter().collect())));
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let literal: String = chars[start..i].iter().collect();
            let token = if literal.contains('.') {
                Token::Float(
                    literal
                        .parse()
                        .map_err(|_| format!("{literal:?} at {start} is not a number"))?,
                )
            } else {
                Token::Int(
                    literal
                        .parse()
                        .map_err(|_| format!("{literal:?} at {start} is not an integer"))?,
                )
            };
            tokens.push((start, token));
            continue;
        }
        if c == '"' || c == '`' || c == '\'' {
            i += 1;
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(format!("the string starting at {start} is not closed"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    let escaped = chars
                        .get(i)
                        .ok_or_else(|| format!("the string starting at {start} is not closed"))?;
                    i += 1;
                    s.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => *other,
                    });
                } else {
                    s.push(d);
                }
            }
            tokens.push((start, Token::Str(s)));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let punct = ["==", "!=", "&&", "||"]
            .into_iter()
            .find(|p| *p == two)
            .or_else(|| {
                ["!", "|", "(", ")", "[", "]", ",", "."]
                    .into_iter()
                    .find(|p| p.starts_with(c))
            })
            .ok_or_else(|| format!("unexpected {c:?} at {start}"))?;
        i += punct.len();
        tokens.push((start, Token::Punct(punct)));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    len: usize,
}

/// Parses an expression; errors give the position.
pub fn parse(text: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        tokens: lex(text)?,
        pos: 0,
        len: text.len(),
    };
    let expr = parser.expr(0)?;
    match parser.tokens.get(parser.pos) {
        None => Ok(expr),
        Some((at, token)) => Err(format!("unexpected {} at {at}", describe(token))),
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Ident(s) => format!("name {s:?}"),
        Token::Str(s) => format!("string {s:?}"),
        Token::Int(n) => format!("number {n}"),
        Token::Float(n) => format!("number {n}"),
        Token::Punct(p) => format!("{p:?}"),
    }
}

/// Binary operators by precedence, lowest first.
const LEVELS: [&[(&str, Op)]; 4] = [
    &[("||", Op::Or)],
    &[("&&", Op::And)],
    &[("==", Op::Eq), ("!=", Op::Ne)],
    &[("|", Op::Default)],
];

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.len, |(at, _)| *at)
    }

    fn eat(&mut self, punct: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Punct(p)) if *p == punct);
        self.pos += usize::from(found);
        found
    }

    fn expect(&mut self, punct: &str) -> Result<(), String> {
        if self.eat(punct) {
            return Ok(());
        }
        let found = self.peek().map_or("the end".to_string(), describe);
        Err(format!(
            "expected {punct:?} at {}, found {found}",
            self.at()
        ))
    }

    fn expr(&mut self, level: usize) -> Result<Expr, String> {
        let Some(ops) = LEVELS.get(level) else {
            return self.unary();
        };
        let mut left = self.expr(level + 1)?;
        'more: loop {
            for (punct, op) in *ops {
                if self.eat(punct) {
                    let right = self.expr(level + 1)?;
                    left = Expr::Binary(*op, Box::new(left), Box::new(right));
                    continue 'more;
                }
            }
            return Ok(left);
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        let mut expr = self.primary()?;
        loop {
            if self.eat("[") {
                let key = self.expr(0)?;
                self.expect("]")?;
                expr = Expr::Index(Box::new(expr), Box::new(key));
            } else if self.eat(".") {
                let Some(Token::Ident(method)) = self.peek().cloned() else {
                    return Err(format!("expected a function name at {}", self.at()));
                };
                self.pos += 1;
                let mut args = vec![expr];
                args.extend(self.args(&method)?);
                expr = Expr::Call(method, args);
            } else {
                return Ok(expr);
            }
        }
    }

    fn args(&mut self, function: &str) -> Result<Vec<Expr>, String> {
        if !self.eat("(") {
            return Err(format!(
                "expected \"(\" after {function:?} at {}",
                self.at()
            ));
        }
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let at = self.at();
        let token = self
            .peek()
            .cloned()
            .ok_or_else(|| format!("expected an operand at {at}, found the end"))?;
        self.pos += 1;
        match token {
            Token::Str(s) => Ok(Expr::Const(Value::String(s))),
            Token::Int(n) => Ok(Expr::Const(Value::Int64(n))),
            Token::Float(n) => Ok(Expr::Const(Value::Double(n))),
            Token::Punct("(") => {
                let expr = self.expr(0)?;
                self.expect(")")?;
                Ok(expr)
            }
            Token::Ident(name) if name == "true" || name == "false" => {
                Ok(Expr::Const(Value::Bool(name == "true")))
            }
            Token::Ident(first) => {
                if matches!(self.peek(), Some(Token::Punct("("))) {
                    let args = self.args(&first)?;
                    return Ok(Expr::Call(first, args));
                }
                // A dotted attribute name, up to a segment that is a call.
                let mut name = first;
                while matches!(self.peek(), Some(Token::Punct(".")))
                    && matches!(self.tokens.get(self.pos + 1), Some((_, Token::Ident(_))))
                    && !matches!(self.tokens.get(self.pos + 2), Some((_, Token::Punct("("))))
                {
                    let Some((_, Token::Ident(segment))) = self.tokens.get(self.pos + 1) else {
                        unreachable!("checked above")
                    };
                    name = format!("{name}.{segment}");
                    self.pos += 2;
                }
                Ok(Expr::Attr(name))
            }
            other => Err(format!("unexpected {} at {at}", describe(&other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(name: &str) -> Box<Expr> {
        Box::new(Expr::Attr(name.into()))
    }

    fn string(s: &str) -> Box<Expr> {
        Box::new(Expr::Const(Value::String(s.into())))
    }

    #[test]
    fn precedence_is_gos() {
        let parsed = parse(r#"a.b == "x" || !c && d["k"] | "y" != "z""#).unwrap();
        let expected = Expr::Binary(
            Op::Or,
            Box::new(Expr::Binary(Op::Eq, attr("a.b"), string("x"))),
            Box::new(Expr::Binary(
                Op::And,
                Box::new(Expr::Not(attr("c"))),
                Box::new(Expr::Binary(
                    Op::Ne,
                    Box::new(Expr::Binary(
                        Op::Default,
                        Box::new(Expr::Index(attr("d"), string("k"))),
                        string("y"),
                    )),
                    string("z"),
                )),
            )),
        );
        assert_eq!(parsed, expected);
    }

    #[test]
    fn calls_and_receiver_calls() {
        assert_eq!(
            parse(r#"request.path.startsWith("/v1")"#).unwrap(),
            Expr::Call(
                "startsWith".into(),
                vec![*attr("request.path"), *string("/v1")]
            )
        );
        assert_eq!(
            parse("emptyStringMap()").unwrap(),
            Expr::Call("emptyStringMap".into(), vec![])
        );
        assert_eq!(
            parse("conditional(true, 1, 2.5)").unwrap(),
            Expr::Call(
                "conditional".into(),
                vec![
                    Expr::Const(Value::Bool(true)),
                    Expr::Const(Value::Int64(1)),
                    Expr::Const(Value::Double(2.5))
                ]
            )
        );
    }

    #[test]
    fn errors_say_where() {
        for (text, error) in [
            ("a ==", "expected an operand at 4"),
            ("a = b", "unexpected '=' at 2"),
            (r#""open"#, "not closed"),
            ("f(a b)", "expected \",\" at 4"),
            ("a b", "unexpected name \"b\" at 2"),
        ] {
            let got = parse(text).unwrap_err();
            assert!(got.contains(error), "{text:?}: {got}");
        }
    }
}
