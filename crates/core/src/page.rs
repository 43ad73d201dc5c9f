//! Cursor pagination, shared by files and batches.

use serde::Serialize;

use crate::error::ApiError;

/// Sort order by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

impl Order {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        match raw {
            "asc" => Ok(Self::Asc),
            "desc" => Ok(Self::Desc),
            other => Err(ApiError::invalid_value(
                "order",
                format!("Invalid value '{other}' for 'order': expected 'asc' or 'desc'."),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Asc => "asc",
            Self::Desc => "desc",
        }
    }
}

/// Parses a `limit` query value within `1..=max`, naming the bound in the 400.
pub fn parse_limit(raw: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    let value: i64 = raw.parse().map_err(|_| {
        ApiError::new(
            crate::ErrorKind::InvalidRequest,
            format!("Invalid type for 'limit': expected an integer, got '{raw}'."),
        )
        .with_param("limit")
        .with_code("invalid_type")
    })?;
    if value < 1 || value > i64::from(max) {
        return Err(ApiError::invalid_value(
            "limit",
            format!("Invalid 'limit': {value} is not between 1 and {max}."),
        ));
    }
    u32::try_from(value).map_err(|_| ApiError::invalid_value("limit", "limit out of range"))
}

/// One page of a list, in OpenAI's shape. All five keys are always serialised.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ListPage<T: Serialize> {
    #[schema(schema_with = crate::schema::object_list)]
    pub object: &'static str,
    pub data: Vec<T>,
    /// Id of the first item of `data`; null when it is empty.
    #[schema(required = true)]
    pub first_id: Option<String>,
    /// Id of the last item of `data` (the next page's `after`); null when it is empty.
    #[schema(required = true)]
    pub last_id: Option<String>,
    /// Whether items follow this page.
    pub has_more: bool,
}

impl<T: Serialize> ListPage<T> {
    /// Builds the page from items already in order, `id` giving each item's id.
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> String) -> Self {
        Self {
            first_id: data.first().map(&id),
            last_id: data.last().map(&id),
            object: "list",
            data,
            has_more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_bounds() {
        assert_eq!(parse_limit(None, 20, 100), Ok(20));
        assert_eq!(parse_limit(Some("1"), 20, 100), Ok(1));
        assert_eq!(parse_limit(Some("100"), 20, 100), Ok(100));
        assert!(parse_limit(Some("0"), 20, 100).is_err());
        assert!(parse_limit(Some("101"), 20, 100).is_err());
        assert!(parse_limit(Some("-3"), 20, 100).is_err());
        let e = parse_limit(Some("ten"), 20, 100).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_type"));
    }

    #[test]
    fn order_parses() {
        assert_eq!(Order::parse("asc"), Ok(Order::Asc));
        assert_eq!(Order::default(), Order::Desc);
        assert_eq!(
            Order::parse("up").unwrap_err().param.as_deref(),
            Some("order")
        );
    }

    #[test]
    fn page_ids() {
        let p = ListPage::new(vec!["a".to_string(), "b".to_string()], false, |s| s.clone());
        assert_eq!(p.first_id.as_deref(), Some("a"));
        assert_eq!(p.last_id.as_deref(), Some("b"));
        let e: ListPage<String> = ListPage::new(vec![], false, |s| s.clone());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false})
        );
    }
}
