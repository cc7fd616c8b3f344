//! One builder for the nftables scripts the lab loads (`nft -f -`): the NAT rulesets of
//! `nat.rs` and the IPv6 firewall of `ipv6.rs` are all "replace this table atomically, with these
//! maps and chains", so the text layout lives here once.

/// An `nft -f` script that replaces one table in a single transaction.
#[derive(Debug)]
pub(crate) struct Table {
    out: String,
}

impl Table {
    /// Starts the script for table `name` of `family` (`ip`, `ip6`): the script first makes sure
    /// the table exists, then deletes and recreates it, all in one transaction, so a reload
    /// never leaves the namespace without rules.
    pub(crate) fn replace(family: &str, name: &str) -> Self {
        Table {
            out: format!(
                "table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n"
            ),
        }
    }

    /// A block (`chain x`, `map y`) whose first line is `head` and whose statements are `lines`.
    pub(crate) fn block<S: AsRef<str>>(&mut self, head: &str, lines: &[S]) -> &mut Self {
        self.out.push_str("  ");
        self.out.push_str(head);
        self.out.push_str(" {\n");
        for l in lines {
            self.out.push_str("    ");
            self.out.push_str(l.as_ref());
            self.out.push('\n');
        }
        self.out.push_str("  }\n");
        self
    }

    /// A base chain: `type {hook}; policy accept;` followed by `rules`.
    pub(crate) fn chain<S: AsRef<str>>(
        &mut self,
        name: &str,
        hook: &str,
        rules: &[S],
    ) -> &mut Self {
        let mut lines = vec![format!("type {hook}; policy accept;")];
        lines.extend(rules.iter().map(|r| r.as_ref().to_owned()));
        self.block(&format!("chain {name}"), &lines)
    }

    /// The finished script.
    pub(crate) fn finish(mut self) -> String {
        self.out.push_str("}\n");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_replaced_atomically_with_its_chains() {
        let mut t = Table::replace("ip6", "x");
        t.chain("forward", "filter hook forward priority filter", &["drop"]);
        assert_eq!(
            t.finish(),
            "table ip6 x\ndelete table ip6 x\ntable ip6 x {\n  chain forward {\n    type filter \
             hook forward priority filter; policy accept;\n    drop\n  }\n}\n"
        );
    }
}
