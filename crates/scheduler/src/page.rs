//! Pages of a list answer cut to fit one gRPC message.
//!
//! tonic refuses a message over 4 MiB, on either side, so a page of large objects (batches
//! with 1,000 validation errors each, files with long names) would make the whole list fail.
//! The scheduler stops adding items before the page's encoded size passes
//! [`LIST_BUDGET_BYTES`]; the page then says `has_more`, and its last item is the next cursor.

use prost::Message;

/// Most encoded bytes of one page's items: a margin of 1 MiB under tonic's 4 MiB default
/// limit leaves room for the rest of the message and its framing.
pub const LIST_BUDGET_BYTES: usize = 3 * 1024 * 1024;

/// Keeps the longest prefix of `items` whose encoding stays within `budget` bytes (at least
/// one item, so a list always moves on); `has_more` is the store's answer, true as well when
/// items were left out.
pub fn fit<T: Message>(items: Vec<T>, has_more: bool, budget: usize) -> (Vec<T>, bool) {
    let mut used = 0usize;
    let mut kept = Vec::with_capacity(items.len());
    let total = items.len();
    for item in items {
        let len = item.encoded_len();
        // a repeated field entry: one tag byte, the length varint, the message
        let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !kept.is_empty() && used + size > budget {
            break;
        }
        used += size;
        kept.push(item);
    }
    let cut = kept.len() < total;
    (kept, has_more || cut)
}

#[cfg(test)]
mod tests {
    use nightshift_proto::v1;

    use super::*;

    fn file(name_len: usize) -> v1::File {
        v1::File {
            id: "file-x".into(),
            filename: "n".repeat(name_len),
            ..Default::default()
        }
    }

    #[test]
    fn pages_are_cut_before_the_budget() {
        let items: Vec<_> = (0..10).map(|_| file(100)).collect();
        let one = {
            let len = file(100).encoded_len();
            1 + prost::encoding::encoded_len_varint(len as u64) + len
        };
        let (kept, more) = fit(items.clone(), false, 3 * one);
        assert_eq!((kept.len(), more), (3, true));
        let (kept, more) = fit(items.clone(), false, 3 * one - 1);
        assert_eq!((kept.len(), more), (2, true));
        let (kept, more) = fit(items.clone(), false, 10 * one);
        assert_eq!((kept.len(), more), (10, false));
        let (kept, more) = fit(items, true, 10 * one);
        assert_eq!((kept.len(), more), (10, true));
        // The whole response stays within the budget plus its own few bytes.
        let page = v1::ListFilesResponse {
            files: fit((0..10).map(|_| file(100)).collect(), false, 3 * one).0,
            has_more: true,
        };
        assert!(page.encoded_len() <= 3 * one + 2);
    }

    #[test]
    fn one_item_always_goes_through() {
        let (kept, more) = fit(vec![file(1000), file(1)], false, 10);
        assert_eq!((kept.len(), more), (1, true));
        let (kept, more) = fit(Vec::<v1::File>::new(), false, 10);
        assert_eq!((kept.len(), more), (0, false));
    }
}
