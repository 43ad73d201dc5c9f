//! `nightshift admin webhooks …`: a tenant's webhook endpoints, for operators (the tenant
//! itself uses `/v1/webhook_endpoints` with its API key).

use clap::Subcommand;
use nightshift_proto::client::SchedulerClient;
use nightshift_proto::v1::{
    CreateWebhookEndpointRequest, ListWebhookEndpointsRequest, WebhookEndpoint,
    WebhookEndpointRequest,
};

#[derive(Subcommand)]
pub enum WebhooksCmd {
    /// Lists a tenant's endpoints (one line each: id, url, event types, name).
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Registers an endpoint for a tenant and prints it with its secret (shown only here).
    Create {
        #[arg(long)]
        tenant: String,
        /// Where events are POSTed (http or https).
        #[arg(long)]
        url: String,
        /// An event type to deliver (repeatable); every batch event when absent.
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Deletes a tenant's endpoint and its pending deliveries.
    Delete {
        #[arg(long)]
        tenant: String,
        /// The endpoint's id (`we_…`).
        id: String,
    },
}

fn line(e: &WebhookEndpoint) -> String {
    format!(
        "{}\t{}\t{}\t{}",
        e.id,
        e.url,
        e.event_types.join(","),
        e.name
    )
}

pub async fn run(control: &SchedulerClient, cmd: WebhooksCmd) -> anyhow::Result<()> {
    match cmd {
        WebhooksCmd::List { tenant } => {
            let resp = control
                .webhooks()
                .list_webhook_endpoints(ListWebhookEndpointsRequest { tenant_id: tenant })
                .await
                .map_err(|s| anyhow::anyhow!("list webhook endpoints: {}", s.message()))?
                .into_inner();
            for e in &resp.endpoints {
                println!("{}", line(e));
            }
        }
        WebhooksCmd::Create {
            tenant,
            url,
            event_types,
            name,
        } => {
            let e = control
                .webhooks()
                .create_webhook_endpoint(CreateWebhookEndpointRequest {
                    tenant_id: tenant,
                    url,
                    event_types,
                    name,
                })
                .await
                .map_err(|s| anyhow::anyhow!("create webhook endpoint: {}", s.message()))?
                .into_inner();
            println!(
                "id={}\nurl={}\nevent_types={}\nsigning_secret={}",
                e.id,
                e.url,
                e.event_types.join(","),
                e.signing_secret.unwrap_or_default()
            );
        }
        WebhooksCmd::Delete { tenant, id } => {
            let e = control
                .webhooks()
                .delete_webhook_endpoint(WebhookEndpointRequest {
                    tenant_id: tenant,
                    id,
                })
                .await
                .map_err(|s| anyhow::anyhow!("delete webhook endpoint: {}", s.message()))?
                .into_inner();
            println!("deleted {}", e.id);
        }
    }
    Ok(())
}
