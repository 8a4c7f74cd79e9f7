//! Tables as istioctl prints them (Go's `tabwriter` with a padding of 5):
//! every column as wide as its widest cell plus five spaces, the last one
//! unpadded.

/// `headers` above `rows`, aligned.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        let cells: Vec<&str> = cells.collect();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i] + 5 - cell.chars().count();
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell_and_five_spaces() {
        let rows = vec![
            vec!["10.0.0.1".to_string(), "80".to_string(), "HTTP".to_string()],
            vec![
                "0.0.0.0".to_string(),
                "15001".to_string(),
                "TCP".to_string(),
            ],
        ];
        assert_eq!(
            render(&["ADDRESS", "PORT", "TYPE"], &rows),
            "ADDRESS      PORT      TYPE\n\
             10.0.0.1     80        HTTP\n\
             0.0.0.0      15001     TCP\n"
        );
    }
}
